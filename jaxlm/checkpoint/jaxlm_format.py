"""The jaxlm checkpoint directory: an Orbax checkpoint of the parameters.

Layout::

    DIR/config.json          HF-style config (the same file HF reads)
    DIR/jaxlm_checkpoint.json format marker: version and parameter dtype
    DIR/params/              Orbax checkpoint; tree = nested dotted jaxlm names,
                             per layer (``model.layers.<i>....``), jaxlm layout
    DIR/tokenizer.model ...  copied alongside when present

Writing is streaming: groups of tensors (one decoder layer at a time) are
added with Orbax partial saves, so host memory holds one group, never the
model. Reading returns the tensors asked for, placed with given shardings.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import jax
import numpy as np

from jaxlm.checkpoint.orbax_compat import load_tree, ocp, tree_metadata
from jaxlm.errors import CheckpointError
from jaxlm.files import is_main_process

MARKER = "jaxlm_checkpoint.json"
PARAMS = "params"
FORMAT_VERSION = 1


def is_jaxlm_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _group_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else name


def save_params(dst: str, named_arrays: Iterable[tuple[str, np.ndarray]], *, param_dtype: str,
                quantize: str | None = None, quantize_output: bool = False) -> int:
    """Writes ``DIR/params`` and the marker from a stream of ``(name, array)``.

    Consecutive tensors of one decoder layer are saved together; returns the
    number of bytes written (uncompressed). ``quantize`` marks a quantized
    checkpoint (`jaxlm.checkpoint.quant_layout`).
    """
    params_dir = os.path.join(dst, PARAMS)
    group, pending, total = None, {}, 0

    def flush():
        if pending:
            ocp.partial.save(params_dir, nest(pending))
            pending.clear()

    for name, array in named_arrays:
        if _group_of(name) != group:
            flush()
            group = _group_of(name)
        pending[name] = array
        total += array.nbytes
    flush()
    ocp.partial.finalize(params_dir)
    if is_main_process():
        marker = {"format": "jaxlm", "version": FORMAT_VERSION, "param_dtype": param_dtype, "layout": "per-layer"}
        if quantize is not None:
            marker.update(quantize=quantize, quantize_output=bool(quantize_output))
        with open(os.path.join(dst, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
            f.write("\n")
    return total


def read_marker(path: str) -> dict:
    file = os.path.join(path, MARKER)
    try:
        with open(file, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read jaxlm checkpoint marker ({e})") from None
    if marker.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: unsupported jaxlm checkpoint version {marker.get('version')!r}")
    return marker


def stored_arrays(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``name -> (shape, dtype)`` of every stored parameter, from Orbax metadata."""
    params_dir = os.path.join(path, PARAMS)
    try:
        meta = tree_metadata(params_dir)
    except Exception as e:  # orbax raises assorted errors for damaged directories
        raise CheckpointError(f"{params_dir}: not a readable Orbax checkpoint ({e})") from None
    return {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in flatten(meta).items()}


def load_arrays(path: str, targets: dict[str, object], *,
                stored: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> dict[str, object]:
    """Loads the named arrays; ``targets`` maps a name to a ``jax.ShapeDtypeStruct``
    (with ``sharding`` for placed jax arrays) or to a numpy array (host copy).

    ``stored`` is `stored_arrays(path)` when the caller already has it (the Orbax
    metadata is then not read again)."""
    params_dir = os.path.join(path, PARAMS)
    if stored is None:
        stored = stored_arrays(path)
    missing = [n for n in targets if n not in stored]
    if missing:
        raise CheckpointError(f"{params_dir}: missing parameter {missing[0]!r}")
    abstract = {n: targets.get(n, ocp.PLACEHOLDER) for n in stored}
    try:
        loaded = load_tree(params_dir, nest(abstract))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({e})") from None
    flat = flatten(loaded)
    return {n: flat[n] for n in targets}


def iter_arrays(path: str, names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields host numpy arrays one at a time (for streaming export); the metadata is read once."""
    stored = stored_arrays(path)
    for name in names:
        shape, dtype = stored[name]
        yield name, load_arrays(path, {name: np.empty(shape, dtype)}, stored=stored)[name]

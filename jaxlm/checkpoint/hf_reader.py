"""Reading HF InternLM2 checkpoint directories tensor by tensor, without torch.

Supports ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, and (with the torch extra) ``pytorch_model.bin``
or sharded ``.bin`` with its index. Only one ``.bin`` shard is held at a time;
safetensors are memory-mapped and read per tensor (or per slice).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" dtype for safetensors)
import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SUPPORTED_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def is_hf_checkpoint(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE))


def _read_index(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint index ({e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: 'weight_map' must map tensor names to files")
    folder = os.path.dirname(path)
    for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{path}: lists shard {shard!r}, which is missing from {folder}")
    return weight_map


class _SafetensorsFile:
    """Header read once; each tensor read through a short-lived mapping.

    Keeping the file mapped would count every page already read toward the
    process's RSS until the end; reopening per read (a header parse, well
    under a millisecond) keeps resident memory at about one tensor.
    """

    def __init__(self, path: str):
        self.path = path
        with self._open() as f:
            self._info = {}
            for name in f.keys():
                piece = f.get_slice(name)
                code = piece.get_dtype()
                self._info[name] = (tuple(piece.get_shape()), _ST_DTYPES.get(code, code.lower()))

    def _open(self):
        from safetensors import SafetensorError, safe_open

        try:
            return safe_open(self.path, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name) -> str:
        return self._info[name][1]

    def read(self, name, index=None) -> np.ndarray:
        with self._open() as f:
            try:
                if index is None:
                    return f.get_tensor(name)
                return f.get_slice(name)[index]
            except Exception as e:  # safetensors raises plain Exceptions for bad buffers
                raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({e})") from None


class _TorchBinFile:
    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path}: reading .bin checkpoints needs PyTorch; install it with "
                f"`pip install 'jaxlm[torch]'` (or convert the checkpoint to safetensors)") from None
        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load PyTorch checkpoint ({e})") from None
        if not isinstance(self._sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, got {type(self._sd).__name__}")

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def dtype(self, name):
        return str(self._sd[name].dtype).removeprefix("torch.")

    def read(self, name, index=None) -> np.ndarray:
        import torch

        t = self._sd[name]
        if index is not None:
            t = t[index]
        if t.dtype == torch.bfloat16:  # numpy has no bf16: move the bits
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.contiguous().numpy()


class HFCheckpoint:
    """The tensors of an HF directory, validated against its config."""

    def __init__(self, path: str, config: InternLM2Config | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        self.path = path
        self.config = config if config is not None else InternLM2Config.from_pretrained(path)
        self._where: dict[str, str] = {}     # tensor name -> file name
        self._open: dict[str, object] = {}   # file name -> open reader
        self._is_bin = False
        join = lambda f: os.path.join(path, f)
        if os.path.isfile(join(SAFETENSORS_INDEX)):
            self._where = _read_index(join(SAFETENSORS_INDEX))
        elif os.path.isfile(join(SAFETENSORS_SINGLE)):
            self._where = {n: SAFETENSORS_SINGLE for n in self._file(SAFETENSORS_SINGLE).names()}
        elif os.path.isfile(join(BIN_INDEX)):
            self._where, self._is_bin = _read_index(join(BIN_INDEX)), True
        elif os.path.isfile(join(BIN_SINGLE)):
            self._is_bin = True
            self._where = {n: BIN_SINGLE for n in self._file(BIN_SINGLE).names()}
        else:
            raise CheckpointError(
                f"{path}: no weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                f"{BIN_SINGLE} or {BIN_INDEX})")
        if not self._is_bin:  # open every shard now: a corrupt one fails before any work
            for shard in sorted(set(self._where.values())):
                listed = {n for n, f in self._where.items() if f == shard}
                missing = listed - set(self._file(shard).names())
                if missing:
                    raise CheckpointError(f"{join(shard)}: the index lists {sorted(missing)[0]!r}, "
                                          f"which this shard does not contain")

    # ------------------------------------------------------------------ files
    def _file(self, fname: str):
        reader = self._open.get(fname)
        if reader is None:
            full = os.path.join(self.path, fname)
            if fname.endswith(".bin"):
                self._open.clear()  # keep at most one .bin shard in memory
                reader = _TorchBinFile(full)
            else:
                reader = _SafetensorsFile(full)
            self._open[fname] = reader
        return reader

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self._where[name]).shape(name)

    def dtype(self, name: str) -> str:
        return self._file(self._where[name]).dtype(name)

    def read(self, name: str, index=None) -> np.ndarray:
        return self._file(self._where[name]).read(name, index)

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self._where[name])

    # ------------------------------------------------------------- validation
    def validate(self) -> list[hf_layout.Entry]:
        """Checks names, shapes and dtypes against the config; returns the entries in file order."""
        cfg = self.config
        expected = hf_layout.by_hf_name(cfg)
        present = set(self._where)
        missing = [n for n in expected if n not in present]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]!r}{more}")
        unexpected = sorted(n for n in present - set(expected)
                            if not hf_layout.IGNORED_HF.match(n)
                            and not (cfg.tie_word_embeddings and n == hf_layout.OPTIONAL_WHEN_TIED))
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{self.path}: unexpected tensor {unexpected[0]!r}{more} "
                                  f"for this config")
        ordered = sorted(expected.values(), key=lambda e: (self._where[e.hf_name], e.hf_name))
        for entry in ordered:
            name = entry.hf_name
            want, got = entry.rule.hf_shape(cfg), self.shape(name)
            if tuple(got) != tuple(want):
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has shape {tuple(got)}, "
                                      f"but the config implies {tuple(want)}")
            dtype = self.dtype(name)
            if dtype not in SUPPORTED_DTYPES:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has unsupported dtype "
                                      f"{dtype} (supported: {', '.join(SUPPORTED_DTYPES)})")
        return ordered

    def checkpoint_dtype(self) -> str:
        """The dtype most weights are stored in."""
        counts: dict[str, int] = {}
        for e in hf_layout.entries(self.config):
            d = self.dtype(e.hf_name)
            counts[d] = counts.get(d, 0) + int(np.prod(self.shape(e.hf_name)))
        return max(counts, key=counts.get)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in set(self._where.values()))

    def read_jaxlm(self, entry: hf_layout.Entry, index: tuple | None = None) -> np.ndarray:
        """The jaxlm-layout tensor of ``entry``, or just ``index`` (slices over jaxlm dims) of it.

        With a slice, only the rows and columns of the HF tensor that the slice
        covers are read (this is how each host reads just what its devices hold).
        Every `hf_layout` rule's ``perm`` is the identity (jaxlm keeps HF's
        ``[out, in]`` order), so the jaxlm dims are the HF dims unflattened and a
        slice maps onto HF rows and columns directly.
        """
        rule, cfg = entry.rule, self.config
        if index is None:
            return rule.to_jaxlm(self.read(entry.hf_name), cfg)
        split, hf_shape = rule.split(cfg), rule.hf_shape(cfg)
        if rule.perm != tuple(range(len(split))):
            raise NotImplementedError(f"{rule.jaxlm}: sliced reads assume an identity perm, got {rule.perm}")
        index = tuple(index) + (slice(None),) * (len(split) - len(index))
        ranges = [sl.indices(n)[:2] for sl, n in zip(index, split)]
        hf_index, local_shape, post = [], [], []
        dim = 0
        for hf_size in hf_shape:  # split dims dim..end multiply to this HF dim
            group, size = [], 1
            while size < hf_size or not group:
                group.append(dim)
                size *= split[dim]
                dim += 1
            inner = [split[d] for d in group[1:]]
            rest_full = all(ranges[d] == (0, split[d]) for d in group[1:])
            first = group[0]
            if rest_full:
                start, stop = ranges[first]
                step = int(np.prod(inner)) if inner else 1
                hf_index.append(slice(start * step, stop * step))
                local_shape += [stop - start] + inner
                post += [slice(None)] * len(group)
            else:
                hf_index.append(slice(None))
                local_shape += [split[d] for d in group]
                post += [slice(*ranges[d]) for d in group]
        data = self.read(entry.hf_name, tuple(hf_index)).reshape(local_shape)
        return np.ascontiguousarray(data[tuple(post)])

    def iter_jaxlm(self, dtype=None, progress: bool | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yields ``(jaxlm_name, array)`` in jaxlm layout, one tensor at a time."""
        from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

        entries = self.validate()
        if progress is None:
            progress = self.total_bytes() > (1 << 30)
        bar = tqdm(entries, desc=f"reading {os.path.basename(os.path.normpath(self.path))}",
                   unit="tensor", disable=not progress)
        target = None if dtype is None else SUPPORTED_DTYPES[np.dtype(dtype).name]
        for entry in bar:
            array = entry.rule.to_jaxlm(self.read(entry.hf_name), self.config)
            if target is not None and array.dtype != target:
                array = array.astype(target)
            yield entry.jaxlm_name, array

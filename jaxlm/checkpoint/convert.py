"""HF <-> jaxlm checkpoint conversion, streaming tensor by tensor.

hf_to_jaxlm: read one HF tensor, rearrange it, add it to the current layer
group, save the group with an Orbax partial save, release it.
jaxlm_to_hf: restore one tensor, rearrange it back, add it to the current
safetensors shard, write the shard when full.
Peak host memory is about one shard (or layer group) plus one tensor.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.checkpoint import hf_layout, jaxlm_format, quant_layout
from jaxlm.checkpoint.hf_reader import SUPPORTED_DTYPES
from jaxlm.checkpoint.hf_writer import ShardedSafetensorsWriter
from jaxlm.checkpoint.internevo import open_weights
from jaxlm.checkpoint.loading import SIDECAR_FILES
from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.files import atomic_output_dir, check_destination, copy_if_present, parse_size


def _check_dtype(dtype: str | None) -> str | None:
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise JaxlmError(f"--dtype: unsupported dtype {dtype!r}; use float32 or bfloat16")
    return dtype


def hf_to_jaxlm(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False,
                progress: bool | None = None) -> dict:
    """Converts an HF InternLM2 directory into a jaxlm checkpoint at ``dst``."""
    _check_dtype(dtype)
    check_destination(dst, overwrite)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    reader = open_weights(src)  # an HF or InternEvo Origin directory
    config = reader.config
    reader.validate()  # every problem is found before anything is written
    out_dtype = dtype or reader.checkpoint_dtype()
    with atomic_output_dir(dst, overwrite) as tmp:
        nbytes = jaxlm_format.save_params(tmp, reader.iter_jaxlm(dtype=out_dtype, progress=progress),
                                          param_dtype=out_dtype)
        config.replace(extra={**config.extra, "torch_dtype": out_dtype}).to_json_file(
            os.path.join(tmp, "config.json"))
        copied = copy_if_present(src, tmp, SIDECAR_FILES)
    return {"dst": dst, "bytes": nbytes, "dtype": out_dtype, "copied": copied}


def _check_jaxlm_source(src: str):
    if not jaxlm_format.is_jaxlm_checkpoint(src):
        raise CheckpointError(f"{src}: not a jaxlm checkpoint (no {jaxlm_format.MARKER})")
    config = InternLM2Config.from_pretrained(src)
    marker = jaxlm_format.read_marker(src)
    stored = jaxlm_format.stored_arrays(src)
    entries = hf_layout.entries(config)
    expected = quant_layout.expected(config, *quant_layout.marker_mode(marker))
    for name, (want, stored_as) in expected.items():
        if name not in stored:
            raise CheckpointError(f"{src}: missing parameter {name!r}")
        shape, dtype = stored[name]
        if shape != want:
            raise CheckpointError(f"{src}: parameter {name!r} has shape {shape}, but the config "
                                  f"implies {want}")
        if dtype.name not in SUPPORTED_DTYPES and dtype.name != stored_as:
            raise CheckpointError(f"{src}: parameter {name!r} has unsupported dtype {dtype}")
    total = sum(int(np.prod(s)) * d.itemsize for s, d in stored.values())
    return config, marker, entries, total


def iter_hf_tensors(src: str, hf_config: str | None = None):
    """(config, dtype name, total bytes, iterator of (hf name, array)) for an HF, Origin or jaxlm directory.

    Streams one tensor at a time, in HF names and layout, whatever the source;
    ``hf_config`` is a config.json for an Origin source (see `internevo.OriginCheckpoint`).
    """
    if jaxlm_format.is_jaxlm_checkpoint(src) and hf_config is None:
        config, marker, entries, total = _check_jaxlm_source(src)
        arrays = quant_layout.iter_dequantized(src, config, marker)   # a quantized source leaves dequantized
        stream = ((e.hf_name, e.rule.to_hf(a, config)) for e, (_, a) in zip(entries, arrays))
        return config, marker["param_dtype"], total, len(entries), stream
    reader = open_weights(src, hf_config)
    config = reader.config
    entries = reader.validate()
    return (config, reader.checkpoint_dtype(), reader.total_bytes(), len(entries),
            ((e.hf_name, reader.read(e.hf_name)) for e in entries))


def write_hf(src: str, dst: str, *, max_shard_size="5GB", overwrite=False, progress=None, transform=None,
             hf_config: str | None = None, sidecar_dir: str | None = None) -> dict:
    """Streams ``src`` (HF, Origin or jaxlm) into HF safetensors at ``dst``; ``transform(name, array)``
    may rewrite each tensor (e.g. merging a LoRA adapter). Tokenizer and other sidecar files
    come from ``sidecar_dir`` (default ``src``)."""
    from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

    max_bytes = parse_size(max_shard_size, "--max-shard-size")
    check_destination(dst, overwrite)
    if sidecar_dir is not None and not os.path.isdir(sidecar_dir):
        raise CheckpointError(f"{sidecar_dir}: not a directory")
    config, dtype, total, count, stream = iter_hf_tensors(src, hf_config)
    if progress is None:
        progress = total > (1 << 30)
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_bytes)
        for name, array in tqdm(stream, total=count, disable=not progress, desc="writing safetensors",
                                unit="tensor"):
            writer.add(name, array if transform is None else transform(name, array))
        files = writer.finish()
        config.replace(extra={**config.extra, "torch_dtype": dtype}).to_json_file(os.path.join(tmp, "config.json"))
        copied = copy_if_present(sidecar_dir or src, tmp, SIDECAR_FILES)
    return {"dst": dst, "bytes": writer.total_bytes, "files": files, "copied": copied}


def jaxlm_to_hf(src: str, dst: str, *, max_shard_size: str | int = "5GB", overwrite: bool = False,
                progress: bool | None = None) -> dict:
    """Converts a jaxlm checkpoint into an HF directory (safetensors) at ``dst``."""
    parse_size(max_shard_size, "--max-shard-size")
    check_destination(dst, overwrite)
    _check_jaxlm_source(src)
    return write_hf(src, dst, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress)

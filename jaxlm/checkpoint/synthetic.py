"""Random InternLM2 checkpoints in HF layout, for tests, demos and benchmarks.

Weights are drawn per tensor and written shard by shard, so even a
multi-GB synthetic checkpoint never sits in memory whole. Norm weights are
random too (around 1), so a test can tell a norm that was skipped.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.checkpoint.hf_reader import BIN_INDEX, BIN_SINGLE
from jaxlm.checkpoint.hf_writer import ShardedSafetensorsWriter
from jaxlm.config import InternLM2Config

_NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def random_hf_tensors(config: InternLM2Config, seed: int = 0, dtype: str = "float32"):
    """Yields ``(hf_name, array)`` for every tensor of ``config``."""
    rng = np.random.default_rng(seed)
    for entry in hf_layout.entries(config):
        shape = entry.rule.hf_shape(config)
        if entry.hf_name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        elif entry.hf_name.endswith(".bias"):
            value = 0.02 * rng.standard_normal(shape, np.float32)
        else:
            std = 0.5 if "tok_embeddings" in entry.hf_name else config.initializer_range * 4
            value = std * rng.standard_normal(shape, np.float32)
        yield entry.hf_name, value.astype(_NP[dtype])


def write_hf_checkpoint(dst: str, config: InternLM2Config, *, seed: int = 0, dtype: str = "float32",
                        fmt: str = "safetensors", max_shard_bytes: int | None = None) -> str:
    """Writes ``config.json`` and random weights (``safetensors`` or ``bin``) to ``dst``."""
    os.makedirs(dst, exist_ok=True)
    config.replace(extra={**config.extra, "torch_dtype": dtype}).to_json_file(
        os.path.join(dst, "config.json"))
    tensors = random_hf_tensors(config, seed, dtype)
    if fmt == "safetensors":
        writer = ShardedSafetensorsWriter(dst, max_shard_bytes or (1 << 62))
        for name, array in tensors:
            writer.add(name, array)
        writer.finish()
    elif fmt == "bin":
        _write_bin(dst, tensors, max_shard_bytes)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return dst


def _write_bin(dst: str, tensors, max_shard_bytes: int | None) -> None:
    import torch

    def to_torch(a):
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    shards, current, size = [], {}, 0
    for name, array in tensors:
        if current and max_shard_bytes and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = to_torch(array)
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        torch.save(shards[0], os.path.join(dst, BIN_SINGLE))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, os.path.join(dst, fname))
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(dst, BIN_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)

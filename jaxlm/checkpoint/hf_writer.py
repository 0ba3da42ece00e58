"""Writing safetensors shards (+ index) under HF names, streaming.

Tensors are buffered until the next one would push the shard past
``max_shard_bytes``; then the shard is written and released. Peak memory is
one shard plus one tensor. Shard names follow HF:
``model-00001-of-00003.safetensors`` with ``model.safetensors.index.json``,
or a single ``model.safetensors``.
"""

from __future__ import annotations

import json
import os

import ml_dtypes  # noqa: F401  (lets safetensors' numpy backend write bfloat16)
import numpy as np
from safetensors.numpy import save_file

from jaxlm.checkpoint.hf_reader import SAFETENSORS_INDEX, SAFETENSORS_SINGLE


class ShardedSafetensorsWriter:
    def __init__(self, dst: str, max_shard_bytes: int):
        self.dst = dst
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temp file, names)
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        path = os.path.join(self.dst, f".shard-{len(self._shards):05d}.safetensors")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Names the shards and writes the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.rename(self._shards[0][0], os.path.join(self.dst, SAFETENSORS_SINGLE))
            return [SAFETENSORS_SINGLE]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(path, os.path.join(self.dst, fname))
            files.append(fname)
            weight_map.update({name: fname for name in names})
        with open(os.path.join(self.dst, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")
        return files

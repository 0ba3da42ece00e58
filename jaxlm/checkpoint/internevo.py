"""InternEvo "Origin" checkpoints, read as HF-named tensors and written back.

InternEvo (the InternLM team's training framework) saves one state dict per
rank: ``model_tp{t}_pp{p}.pt`` in its tensor-parallel modes, ``model_wp{w}_pp{p}.pt``
with ISP weight parallelism, plus ``model_config.pt`` (its pickled ``Config``).
`OriginCheckpoint` joins the shards into the HF tensors on the fly, so every
consumer of an HF reader (``from_pretrained``, ``hf_to_jaxlm``, ``write_hf``)
takes an Origin directory as well.

The layout facts (which tensor splits on which dim, stage-local layer numbers,
the rotary row order) are in `internevo_layout`; ``model_config.pt`` and the
HF config derived from it in `internevo_config`; the writer in `internevo_write`.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.checkpoint.hf_reader import HFCheckpoint, _TorchBinFile
from jaxlm.checkpoint.internevo_config import (CONFIG_FILE, HF_CONFIG_FILE, hf_config_from_origin, is_interleaved,
                                               read_origin_config)
from jaxlm.checkpoint.internevo_layout import (ANY_SHARD_FILE, EMBEDDING_KEYS, LAYER_KEY, LAYER_PARAMS, SPLIT_QKV,
                                               TOP_KEYS, discover_shards, permute_qk, rotary_rows, shard_name,
                                               shard_shapes, split_dims)
from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError


def is_origin_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(ANY_SHARD_FILE.match(f) for f in os.listdir(path))


def open_weights(path: str, hf_config: str | None = None) -> HFCheckpoint:
    """The tensor reader for an HF or Origin directory (both give HF names and layouts)."""
    if is_origin_checkpoint(path):
        return OriginCheckpoint(path, hf_config)
    if hf_config is not None:
        raise CheckpointError(f"{path}: not an InternEvo Origin checkpoint (no model_tp{{t}}_pp{{p}}.pt "
                              f"or model_wp{{w}}_pp{{p}}.pt files)")
    return HFCheckpoint(path)


class OriginCheckpoint(HFCheckpoint):
    """The HF tensors of an Origin directory, joined from its shards on each read.

    `HFCheckpoint.__init__` is not run (there are no HF files); this class sets
    what HFCheckpoint's validation and jaxlm-layout reads use (``path``,
    ``config``, ``_where``) and overrides names/shape/dtype/read/file_of/total_bytes.
    Every shard is opened, and every key and shape checked, before any read.
    """

    def __init__(self, path: str, hf_config: str | None = None):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory")
        self.path = path
        self.mode, self.ranks, self.stages = discover_shards(path)
        self._files: dict[tuple[int, int], _TorchBinFile] = {}
        self._last: tuple[str | None, np.ndarray | None] = (None, None)
        if hf_config is None and os.path.isfile(os.path.join(path, HF_CONFIG_FILE)):
            hf_config = os.path.join(path, HF_CONFIG_FILE)
        config_pt = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(config_pt):
            origin = read_origin_config(config_pt)
        elif hf_config is not None:
            origin = {}
        else:
            raise CheckpointError(f"{path}: no {CONFIG_FILE}; pass --config with the model's HF config.json")
        self.origin = origin
        self.interleaved = is_interleaved(origin)
        self.norm_head = bool(origin.get("norm_head", False))
        self._sources = self._index(path)
        hf = InternLM2Config.from_json_file(hf_config) if hf_config else None
        hidden = origin.get("hidden_size", hf.hidden_size if hf else None)
        self.embed_dim = self._embedding_dim(origin, hidden)
        self.dims = split_dims(self.mode, self.embed_dim)
        w1 = next((s for s in self._sources.values() if s[0] == "feed_forward.w1.weight"), None)
        if w1 is None:
            raise CheckpointError(f"{path}: no layer holds feed_forward.w1.weight")
        intermediate = self._file(0, w1[1]).shape(w1[2][0])[0] * self.ranks
        dtype = self._file(0, w1[1]).dtype(w1[2][0])
        self.config = hf_config_from_origin(origin, intermediate, dtype, config_pt, hf, hf_config)
        if self.num_layers != self.config.num_hidden_layers:
            raise CheckpointError(f"{path}: the {self.stages} stage(s) hold {self.num_layers} layers, but the "
                                  f"config says num_layers={self.config.num_hidden_layers}")
        self._check_shards()
        self._where = {name: shard_name(self.mode, 0, stage) for name, (_, stage, _) in self._sources.items()}

    # ------------------------------------------------------------ discovery
    def _file(self, rank: int, stage: int) -> _TorchBinFile:
        if (rank, stage) not in self._files:  # memory-mapped: open shards cost address space only
            self._files[rank, stage] = _TorchBinFile(os.path.join(self.path, shard_name(self.mode, rank, stage)))
        return self._files[rank, stage]

    def _stage_keys(self, stage: int) -> dict[str, str]:
        """Normalized key -> stored key of a stage; every rank must hold the same keys."""
        per_rank = []
        for rank in range(self.ranks):
            keys = {}
            for key in self._file(rank, stage).names():
                name = key[len("model."):] if key.startswith("model.") else key
                if not name.endswith(".inv_freq"):  # a non-persistent rotary buffer in older saves
                    keys[name] = key
            per_rank.append(keys)
        for rank, keys in enumerate(per_rank[1:], 1):
            odd = sorted(set(keys) ^ set(per_rank[0]))
            if odd:
                holder = 0 if odd[0] in per_rank[0] else rank
                raise CheckpointError(f"{self._file(holder, stage).path}: holds {odd[0]!r}, which "
                                      f"{self._file(rank if holder == 0 else 0, stage).path} lacks")
        return per_rank[0]

    def _index(self, path: str) -> dict[str, tuple[str, int, list[str]]]:
        """HF name -> (Origin suffix, stage, stored keys in one rank's file)."""
        sources: dict[str, tuple[str, int, list[str]]] = {}
        offset = 0
        for stage in range(self.stages):
            keys = self._stage_keys(stage)
            file = self._file(0, stage).path
            local = sorted({int(m.group(1)) for m in map(LAYER_KEY.match, keys) if m})
            if local != list(range(len(local))):
                raise CheckpointError(f"{file}: layer numbers {local} are not 0..{len(local) - 1}")
            split_parts: dict[int, dict[str, str]] = {}
            for name, key in keys.items():
                m = LAYER_KEY.match(name)
                if m and m.group(2) in LAYER_PARAMS:
                    hf, suffix, stored = f"model.layers.{offset + int(m.group(1))}.{m.group(2)}", m.group(2), [key]
                elif m and m.group(2) in SPLIT_QKV:
                    split_parts.setdefault(int(m.group(1)), {})[m.group(2)] = key
                    continue
                elif name in TOP_KEYS:
                    hf, suffix, stored = TOP_KEYS[name], "embedding" if name in EMBEDDING_KEYS else name, [key]
                else:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} (not an InternLM2 parameter)")
                if hf in sources:
                    raise CheckpointError(f"{file}: {key!r} is stored twice (also on stage {sources[hf][1]})")
                sources[hf] = (suffix, stage, stored)
            for layer, parts in split_parts.items():
                hf = f"model.layers.{offset + layer}.attention.wqkv.weight"
                if hf in sources or len(parts) != 3:
                    raise CheckpointError(f"{file}: layer {layer} needs either attention.wqkv.weight or all of "
                                          f"wq/wk/wv, found {sorted(parts)}")
                sources[hf] = ("attention.wqkv.weight", stage, [parts[k] for k in SPLIT_QKV])
            offset += len(local)
        self.num_layers = offset
        return sources

    def _embedding_dim(self, origin: dict, hidden: int | None) -> int:
        if "embed_split_hidden" in origin:
            return 1 if origin["embed_split_hidden"] else 0
        embed = self._sources.get("model.tok_embeddings.weight")
        if embed is None or hidden is None or self.ranks == 1:
            return 0
        cols = self._file(0, embed[1]).shape(embed[2][0])[1]
        return 1 if cols * self.ranks == hidden else 0

    def _check_shards(self) -> None:
        try:
            want_shapes = shard_shapes(self.config, self.ranks, self.mode, self.embed_dim)
        except CheckpointError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        for name in hf_layout.by_hf_name(self.config):
            if name not in self._sources:
                raise CheckpointError(f"{self.path}: no shard holds {name!r} (in Origin names "
                                      f"{name.removeprefix('model.')!r})")
        for name, (suffix, stage, keys) in self._sources.items():
            first_dtype = None
            for rank in range(self.ranks):
                f = self._file(rank, stage)
                for key in keys:
                    part = key.rsplit(".", 2)[-2] if len(keys) == 3 else None
                    want = want_shapes[f"attention.{part}.weight" if part else suffix]
                    if f.shape(key) != want:
                        raise CheckpointError(f"{f.path}: tensor {key!r} has shape {f.shape(key)}, but the "
                                              f"config implies {want}")
                    first_dtype = first_dtype or f.dtype(key)
                    if f.dtype(key) != first_dtype:
                        raise CheckpointError(f"{f.path}: tensor {key!r} is {f.dtype(key)}, other shards {first_dtype}")
            if self.dims[suffix] is None:  # replicated: every rank's copy must be the same
                first = self._file(0, stage).read(keys[0])
                for rank in range(1, self.ranks):
                    if not np.array_equal(first, self._file(rank, stage).read(keys[0])):
                        raise CheckpointError(f"{self._file(rank, stage).path}: its copy of {keys[0]!r} differs "
                                              f"from {self._file(0, stage).path}'s")

    # ------------------------------------------------------- reader interface
    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        suffix, stage, keys = self._sources[name]
        shapes = [self._file(0, stage).shape(k) for k in keys]
        shape = [sum(s[0] for s in shapes), *shapes[0][1:]]
        if self.dims[suffix] is not None:
            shape[self.dims[suffix]] *= self.ranks
        return tuple(shape)

    def dtype(self, name: str) -> str:
        _, stage, keys = self._sources[name]
        return self._file(0, stage).dtype(keys[0])

    def file_of(self, name: str) -> str:
        return self._file(0, self._sources[name][1]).path

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, shard_name(self.mode, r, s)))
                   for r in range(self.ranks) for s in range(self.stages))

    def read(self, name: str, index=None) -> np.ndarray:
        if self._last[0] != name:  # sharded loading asks for several slices of one tensor in a row
            self._last = (name, self._join(name))
        full = self._last[1]
        return full if index is None else np.ascontiguousarray(full[index])

    def _join(self, name: str) -> np.ndarray:
        suffix, stage, keys = self._sources[name]
        dim = self.dims[suffix]
        ranks = [0] if dim is None else range(self.ranks)
        # a split-saved wqkv is re-fused per rank before the ranks are joined
        pieces = [np.concatenate([self._file(r, stage).read(k) for k in keys]) for r in ranks]
        full = pieces[0] if dim is None else np.concatenate(pieces, axis=dim)
        if suffix == "attention.wqkv.weight" and self.interleaved:
            full = permute_qk(full, self.config, rotary_rows(self.config.head_dim))
        if suffix == "output.weight" and self.norm_head:  # InternEvo normalizes the head's rows in forward
            rows = full.astype(np.float32)
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            full = rows.astype(full.dtype)
        return full

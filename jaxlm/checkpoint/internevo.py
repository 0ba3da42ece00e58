"""InternEvo "Origin" checkpoints, read as HF-named tensors and written back.

InternEvo (the InternLM team's training framework) saves one state dict per
rank: ``model_tp{t}_pp{p}.pt`` in its tensor-parallel modes, ``model_wp{w}_pp{p}.pt``
with ISP weight parallelism, plus ``model_config.pt`` (its pickled ``Config``).
`OriginCheckpoint` joins the shards into the HF tensors on the fly, so every
consumer of an HF reader (``from_pretrained``, ``hf_to_jaxlm``, ``write_hf``)
takes an Origin directory as well. `write_origin` splits an HF checkpoint the
way InternEvo's uniform pipeline partition and linear layers split it.

Facts this module relies on (read from InternEvo's sources):
- layer numbers are local to each pipeline stage; keys may carry ``model.``;
- ``wqkv`` rows are grouped per kv head (its q heads, then k, then v), as in HF,
  so shards join along dim 0; newer saves store each rank's ``wqkv`` as row
  slices ``wq``/``wk``/``wv`` of sizes q/n, kv/n, kv/n (not true q/k/v);
- ``wo``/``w2`` split on dim 1 in tensor-parallel files, dim 0 in ISP files;
  the embedding on dim 1 with ``embed_split_hidden``, else dim 0;
- ``qk_interleaved`` (or ``adapt_hf=False``) means each q/k head's rows are in
  rotary pair order (0, 1), (2, 3)...; HF rotates halves (j, j + D/2).
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import re
import zipfile

import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.checkpoint.hf_reader import HFCheckpoint, _TorchBinFile
from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.files import atomic_output_dir, check_destination

SHARD_FILE = re.compile(r"^model_(tp|wp)(\d+)_pp(\d+)\.pt$")
_ANY_SHARD = re.compile(r"^model_(tp|wp)\d+_pp\d+(_dp\d+)?\.pt$")  # with FSDP's, to refuse those by name
CONFIG_FILE = "model_config.pt"
HF_CONFIG_FILE = "config.json"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-zip file format
_DEFAULT_MAX_POSITIONS = 32768  # the released InternLM2 models'; Origin configs rarely say


def is_origin_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(_ANY_SHARD.match(f) for f in os.listdir(path))


def open_weights(path: str, hf_config: str | None = None) -> HFCheckpoint:
    """The tensor reader for an HF or Origin directory (both give HF names and layouts)."""
    if is_origin_checkpoint(path):
        return OriginCheckpoint(path, hf_config)
    if hf_config is not None:
        raise CheckpointError(f"{path}: not an InternEvo Origin checkpoint (no model_tp{{t}}_pp{{p}}.pt "
                              f"or model_wp{{w}}_pp{{p}}.pt files)")
    return HFCheckpoint(path)


# ------------------------------------------------------------- model_config.pt
class _PickledConfig(dict):
    """Stands in for InternEvo's ``Config`` (a dict subclass) while unpickling."""


_CONFIG_CLASS = ("internlm.core.context.parallel_context", "Config")
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
                 ("collections", "OrderedDict")}
_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "float", "half", "double",
                 "int64", "int32", "int16", "int8", "uint8", "bool", "long", "int"}


class _ConfigUnpickler(pickle.Unpickler):
    """Only InternEvo's Config (as a dict), plain containers and torch dtypes.

    ``torch.load(weights_only=True)`` refuses InternEvo's Config class, and a
    full unpickle would run whatever the file names; this admits an allowlist.
    """

    def find_class(self, module, name):
        if (module, name) == _CONFIG_CLASS:
            return _PickledConfig
        if module == "torch" and name in _TORCH_DTYPES:
            try:
                import torch
            except ImportError:
                return f"torch.{name}"
            return getattr(torch, name)
        if (module, name) in _SAFE_GLOBALS:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only InternEvo's Config, "
                                     f"plain values and torch dtypes are read)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds tensors, not a plain config")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def read_origin_config(path: str) -> dict:
    """``model_config.pt`` as a plain dict, whichever way torch.save wrote it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(pickles) != 1:
                    raise pickle.UnpicklingError("no data.pkl in the archive")
                value = _ConfigUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
        else:
            with open(path, "rb") as f:
                value = _ConfigUnpickler(f).load()
                if value == _TORCH_LEGACY_MAGIC:  # then protocol, system info, the object
                    _ConfigUnpickler(f).load()
                    _ConfigUnpickler(f).load()
                    value = _ConfigUnpickler(f).load()
    except Exception as e:  # a corrupt pickle can raise almost anything; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot read the InternEvo config ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected InternEvo's model config (a dict), got {type(value).__name__}")
    return _plain(value)


def is_interleaved(origin: dict) -> bool:
    if "qk_interleaved" in origin:
        return bool(origin["qk_interleaved"])
    if "adapt_hf" in origin:
        return not origin["adapt_hf"]
    return True  # InternEvo's own convert2hf_internlm2 assumes adapt_hf=False when neither is given


def rotary_order_stated(path: str) -> bool:
    """Whether an Origin directory's model_config.pt says which rotary row order it uses."""
    config = os.path.join(path, CONFIG_FILE)
    return os.path.isfile(config) and bool({"qk_interleaved", "adapt_hf"} & set(read_origin_config(config)))


def rotary_rows(head_dim: int) -> np.ndarray:
    """Row order taking an interleaved (pairwise) q/k head to HF's half rotation."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _permute_qk(wqkv: np.ndarray, c: InternLM2Config, rows: np.ndarray) -> np.ndarray:
    grouped = wqkv.reshape(c.num_key_value_heads, c.q_per_kv + 2, c.head_dim, -1).copy()
    grouped[:, :-1] = grouped[:, :-1, rows]  # every q head and the k head; v keeps its order
    return grouped.reshape(wqkv.shape)


# ------------------------------------------------------------------ layout
_LAYER_PARAMS = ("attention.wqkv.weight", "attention.wo.weight", "attention_norm.weight",
                 "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
                 "ffn_norm.weight")
_SPLIT_QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
_EMBEDDING_KEYS = ("tok_embeddings.weight", "tok_embeddings.word_embeddings.weight")
_TOP = {"norm.weight": "model.norm.weight", "output.weight": "output.weight",
        **{k: "model.tok_embeddings.weight" for k in _EMBEDDING_KEYS}}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def shard_name(mode: str, rank: int, stage: int) -> str:
    return f"model_{mode}{rank}_pp{stage}.pt"


def discover_shards(path: str) -> tuple[str, int, int]:
    """(mode 'tp' or 'wp', ranks, stages); every shard the names imply must be there."""
    found = {}
    for name in os.listdir(path):
        m = SHARD_FILE.match(name)
        if m:
            found.setdefault(m.group(1), set()).add((int(m.group(2)), int(m.group(3))))
    if not found:
        fsdp = any(_ANY_SHARD.match(name) for name in os.listdir(path))
        raise CheckpointError(f"{path}: " + ("FSDP-sharded InternEvo saves (model_tp*_pp*_dp*.pt) are not supported"
                              if fsdp else "no InternEvo shards (model_tp{t}_pp{p}.pt or model_wp{w}_pp{p}.pt)"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds both model_tp* and model_wp* shards; keep one save per directory")
    (mode, pairs), = found.items()
    ranks, stages = max(r for r, _ in pairs) + 1, max(s for _, s in pairs) + 1
    missing = [shard_name(mode, r, s) for s in range(stages) for r in range(ranks) if (r, s) not in pairs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing shard {missing[0]}{more}; the shard names imply "
                              f"{ranks} {mode} ranks x {stages} pipeline stages")
    return mode, ranks, stages


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise CheckpointError(f"{what} ({n}) is not divisible by the {parts} parallel ranks")
    return n // parts


def shard_shapes(c: InternLM2Config, ranks: int, mode: str, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape in one rank's file (by Origin suffix)."""
    e, i, v, d = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    div = lambda n, what: _divide(n, ranks, what)
    row_split = mode == "tp"  # wo / w2 are row-parallel (split inputs) in tp files, split outputs in ISP
    return {
        "attention.wqkv.weight": (div(q + 2 * kv, "wqkv rows"), e),
        "attention.wq.weight": (div(q, "wq rows"), e),
        "attention.wk.weight": (div(kv, "wk rows"), e),
        "attention.wv.weight": (div(kv, "wv rows"), e),
        "attention.wo.weight": (e, div(q, "wo columns")) if row_split else (div(e, "wo rows"), q),
        "feed_forward.w1.weight": (div(i, "w1 rows"), e),
        "feed_forward.w3.weight": (div(i, "w3 rows"), e),
        "feed_forward.w2.weight": (e, div(i, "w2 columns")) if row_split else (div(e, "w2 rows"), i),
        "attention_norm.weight": (e,), "ffn_norm.weight": (e,), "norm.weight": (e,),
        "output.weight": (div(v, "output rows"), e),
        "embedding": (v, div(e, "embedding columns")) if embed_dim == 1 else (div(v, "embedding rows"), e),
    }


def split_dims(mode: str, embed_dim: int) -> dict[str, int | None]:
    """The dim each parameter (by Origin suffix) is split on; None: replicated."""
    row = 1 if mode == "tp" else 0
    return {"attention.wqkv.weight": 0, "attention.wo.weight": row, "feed_forward.w1.weight": 0,
            "feed_forward.w3.weight": 0, "feed_forward.w2.weight": row, "output.weight": 0,
            "embedding": embed_dim, "attention_norm.weight": None, "ffn_norm.weight": None,
            "norm.weight": None}


# -------------------------------------------------------------- the HF config
_SHAPE_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
                 "num_attention_heads": "num_attention_heads",
                 "num_kv_attention_heads": "num_key_value_heads", "vocab_size": "vocab_size"}
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")


def _rope_scaling(origin: dict) -> dict | None:
    factor = float(origin.get("rope_scaling_factor", 1.0))
    if factor <= 1.0:
        return None
    kind = str(origin.get("rope_type", "dynamic" if origin.get("use_dynamic_ntk_rope") else "")).lower()
    return {"type": kind, "factor": factor} if kind in ("dynamic", "linear") else None


def hf_config_from_origin(origin: dict, intermediate: int, dtype: str, source: str,
                          hf: InternLM2Config | None = None, hf_source: str | None = None) -> InternLM2Config:
    """The HF config an Origin checkpoint implies; ``hf`` (a given config.json) supplies
    what Origin configs do not hold (positions, rope scaling, token ids) and must agree on shapes."""
    if int(origin.get("num_chunks", 1)) != 1:
        raise CheckpointError(f"{source}: num_chunks={origin['num_chunks']} (interleaved pipeline chunks) "
                              f"is not supported")
    fields = {hkey: origin[okey] for okey, hkey in _SHAPE_FIELDS.items() if okey in origin}
    fields["intermediate_size"] = intermediate
    if "rope_base" in origin or hf is None:
        fields["rope_theta"] = float(origin.get("rope_base", 10000))
    eps = origin.get("layer_norm_epsilon", origin.get("norm_eps"))
    if eps is not None or hf is None:
        fields["rms_norm_eps"] = float(eps if eps is not None else 1e-6)  # InternEvo's InternLM2 default
    if hf is not None:
        for key, value in fields.items():
            if key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                       "vocab_size", "intermediate_size") and getattr(hf, key) != value:
                raise CheckpointError(f"{hf_source}: {key} is {getattr(hf, key)}, but the Origin checkpoint "
                                      f"{source} has {value}")
        data = {**hf.to_dict(), **fields, "bias": False, "tie_word_embeddings": False}
    else:
        missing = [k for k in _REQUIRED if k not in origin]
        if missing:
            raise CheckpointError(f"{source}: the model config has no {missing[0]!r}; "
                                  f"pass --config with the model's HF config.json")
        data = {"architectures": ["InternLM2ForCausalLM"], **fields,
                "num_key_value_heads": origin.get("num_kv_attention_heads", origin["num_attention_heads"]),
                "max_position_embeddings": origin.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS),
                "rope_scaling": _rope_scaling(origin), "bias": False, "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # the InternLM2 tokenizer's
    data.update(model_type="internlm2", torch_dtype=dtype)
    return InternLM2Config.from_dict(data, source=hf_source or source)


# ------------------------------------------------------------------ reading
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
            local = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, keys) if m})
            if local != list(range(len(local))):
                raise CheckpointError(f"{file}: layer numbers {local} are not 0..{len(local) - 1}")
            split_parts: dict[int, dict[str, str]] = {}
            for name, key in keys.items():
                m = _LAYER_KEY.match(name)
                if m and m.group(2) in _LAYER_PARAMS:
                    hf, suffix, stored = f"model.layers.{offset + int(m.group(1))}.{m.group(2)}", m.group(2), [key]
                elif m and m.group(2) in _SPLIT_QKV:
                    split_parts.setdefault(int(m.group(1)), {})[m.group(2)] = key
                    continue
                elif name in _TOP:
                    hf, suffix, stored = _TOP[name], "embedding" if name in _EMBEDDING_KEYS else name, [key]
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
                sources[hf] = ("attention.wqkv.weight", stage, [parts[k] for k in _SPLIT_QKV])
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
            full = _permute_qk(full, self.config, rotary_rows(self.config.head_dim))
        if suffix == "output.weight" and self.norm_head:  # InternEvo normalizes the head's rows in forward
            rows = full.astype(np.float32)
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
            full = rows.astype(full.dtype)
        return full


# ------------------------------------------------------------------ writing
def stage_layers(num_layers: int, stages: int) -> list[range]:
    """InternEvo's uniform partition: L // P layers per stage, the L % P extra ones on the last stages."""
    if num_layers < stages:
        raise JaxlmError(f"--pp {stages}: {num_layers} layers cannot fill {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for stage in range(stages):
        size = base + (stage >= stages - extra)
        out.append(range(start, start + size))
        start += size
    return out


def _origin_key(entry: hf_layout.Entry, local_layer: int | None) -> tuple[str, str]:
    """(key in the rank's state dict, Origin suffix) of an HF entry.

    Keys carry ``model.``: InternEvo saves and loads the state dict of its NaiveAMPModel
    wrapper, whose ``model`` attribute is the network.
    """
    name = entry.hf_name
    if entry.layer is None:
        key = name.removeprefix("model.")
        return f"model.{key}", "embedding" if key in _EMBEDDING_KEYS else key
    suffix = name.split(".", 3)[3]
    return f"model.layers.{local_layer}.{suffix}", suffix


def _mlp_ratio(c: InternLM2Config) -> tuple[float, int]:
    """(mlp_ratio, multiple_of) that InternEvo's FeedForward turns back into the intermediate size:
    ``multiple_of * ceil(int(hidden * ratio) / multiple_of)``."""
    multiple = math.gcd(c.intermediate_size, 256)
    return c.intermediate_size / c.hidden_size, multiple


def origin_config_for(c: InternLM2Config, dtype) -> dict:
    """model_config.pt content: builtins and a torch dtype only, rotary stated explicitly."""
    ratio, multiple = _mlp_ratio(c)
    theta = float(c.rope_theta)
    out = {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
           "num_attention_heads": c.num_attention_heads, "num_kv_attention_heads": c.num_key_value_heads,
           "mlp_ratio": ratio, "multiple_of": multiple, "embed_split_hidden": True,
           "rope_base": int(theta) if theta.is_integer() else theta, "layer_norm_epsilon": float(c.rms_norm_eps),
           "qk_interleaved": False, "adapt_hf": True, "no_bias": True, "norm_head": False,
           "norm_type": "rmsnorm", "num_chunks": 1, "max_position_embeddings": c.max_position_embeddings,
           "dtype": dtype}
    if c.rope_scaling is not None:
        out.update(rope_type=c.rope_type, rope_scaling_factor=c.rope_factor,
                   use_dynamic_ntk_rope=c.rope_type == "dynamic")
    return out


def _to_torch(array: np.ndarray):
    import ml_dtypes
    import torch

    owned = np.array(array, copy=True, order="C")  # a view would save its whole base tensor
    if owned.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(owned.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(owned)


def write_origin(src: str, dst: str, *, tp: int, pp: int, overwrite: bool = False) -> dict:
    """Writes ``model_tp{t}_pp{p}.pt`` for every t < tp, p < pp plus ``model_config.pt`` to ``dst``.

    One rank's file is built at a time, each tensor read as just that rank's slice.
    """
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise JaxlmError(f"{flag}: must be a positive integer, got {value!r}")
    check_destination(dst, overwrite)
    try:
        import torch
    except ImportError:
        raise JaxlmError("writing InternEvo checkpoints needs PyTorch; install it with "
                         "`pip install 'jaxlm[torch]'`") from None
    reader = open_weights(src)
    c = reader.config
    entries = reader.validate()
    layers = stage_layers(c.num_hidden_layers, pp)
    try:
        shard_shapes(c, tp, "tp", embed_dim=1)
    except CheckpointError as e:
        raise JaxlmError(f"--tp {tp}: {e}") from None
    dims = split_dims("tp", embed_dim=1)
    stage_of = lambda e: (0 if "tok_embeddings" in e.hf_name else pp - 1) if e.layer is None else \
        next(s for s, r in enumerate(layers) if e.layer in r)
    dtype = reader.checkpoint_dtype()
    files, nbytes = [], 0
    with atomic_output_dir(dst, overwrite) as tmp:
        for stage in range(pp):
            members = [e for e in entries if stage_of(e) == stage]
            for rank in range(tp):
                state = {}
                for entry in members:
                    key, suffix = _origin_key(entry, None if entry.layer is None else
                                              entry.layer - layers[stage].start)
                    dim = dims[suffix]
                    if dim is None:
                        piece = reader.read(entry.hf_name)
                    else:
                        size = reader.shape(entry.hf_name)[dim] // tp
                        piece = reader.read(entry.hf_name, (slice(None),) * dim +
                                            (slice(rank * size, (rank + 1) * size),))
                    state[key] = _to_torch(piece)
                    nbytes += piece.nbytes
                name = shard_name("tp", rank, stage)
                torch.save(state, os.path.join(tmp, name))
                files.append(name)
        torch.save(origin_config_for(c, getattr(torch, dtype)), os.path.join(tmp, CONFIG_FILE))
    return {"dst": dst, "files": files, "bytes": nbytes, "dtype": dtype}

"""InternEvo's ``model_config.pt``: read without InternEvo, and the HF config both ways.

``model_config.pt`` is a pickled InternEvo ``Config`` (a dict subclass, which
may hold torch dtypes). ``torch.load(weights_only=True)`` refuses that class
and a full unpickle would run whatever the file names, so it is read with an
unpickler that admits an allowlist. `hf_config_from_origin` derives the HF
config an Origin checkpoint implies; `origin_config_for` writes one back.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
import zipfile

from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError

CONFIG_FILE = "model_config.pt"
HF_CONFIG_FILE = "config.json"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-zip file format
_DEFAULT_MAX_POSITIONS = 32768  # the released InternLM2 models'; Origin configs rarely say


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


# ------------------------------------------------------------ writing it back
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

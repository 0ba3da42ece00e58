"""InternLM2 model configuration, read from and written to HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxlm.checkpoint.hub import resolve_model_path
from jaxlm.errors import ConfigError

ROPE_TYPES = ("linear", "dynamic")

# Fields the original `configuration_internlm2.InternLM2Config` reads, with the
# original's defaults: a config.json that omits a field means the default
# (note `bias` defaults to True there, and rms_norm_eps to 1e-6).
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=103168,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    hidden_act="silu",
    max_position_embeddings=2048,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    bias=True,
    rope_theta=10000.0,
    rope_scaling=None,
)


@dataclasses.dataclass(frozen=True)
class InternLM2Config:
    """Shapes and numerics of an InternLM2 model (HF field names)."""

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 2
    # Keys of config.json that jaxlm does not interpret (architectures,
    # auto_map, torch_dtype, ...), kept so a round trip writes them back.
    extra: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    def __hash__(self):
        # rope_scaling is a dict; hash the JSON form of the compared fields so the
        # config can sit in a module's static structure (jit cache keys). `extra`
        # is left out as equality leaves it out: equal configs hash equally.
        compared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        return hash(json.dumps(compared, sort_keys=True, default=str))

    # ----------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_per_kv(self) -> int:
        """Query heads per kv head (the GQA group size g)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope_type(self) -> str | None:
        return None if self.rope_scaling is None else self.rope_scaling["type"]

    @property
    def rope_factor(self) -> float:
        return 1.0 if self.rope_scaling is None else float(self.rope_scaling["factor"])

    def num_params(self) -> int:
        e, i, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        qkv = e * (self.num_attention_heads + 2 * self.num_key_value_heads) * d
        wo = self.num_attention_heads * d * e
        per_layer = qkv + wo + 3 * e * i + 2 * e
        if self.bias:
            per_layer += (self.num_attention_heads + 2 * self.num_key_value_heads) * d + e
        head = 0 if self.tie_word_embeddings else v * e
        return v * e + self.num_hidden_layers * per_layer + e + head

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"config: {name} must be a positive integer, got {value!r}")
        need(self.hidden_size % self.num_attention_heads == 0,
             f"config: hidden_size ({self.hidden_size}) must be divisible by "
             f"num_attention_heads ({self.num_attention_heads})")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"config: num_attention_heads ({self.num_attention_heads}) must be divisible by "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.hidden_act == "silu",
             f"config: hidden_act {self.hidden_act!r} is not supported (InternLM2 uses 'silu')")
        need(float(self.rope_theta) > 0, f"config: rope_theta must be positive, got {self.rope_theta}")
        need(float(self.rms_norm_eps) > 0, f"config: rms_norm_eps must be positive, got {self.rms_norm_eps}")
        rs = self.rope_scaling
        if rs is not None:
            need(isinstance(rs, dict) and "type" in rs and "factor" in rs,
                 f"config: rope_scaling must be {{'type': ..., 'factor': ...}} or null, got {rs!r}")
            need(rs["type"] in ROPE_TYPES,
                 f"config: rope_scaling type {rs['type']!r} is unknown; expected one of {list(ROPE_TYPES)}")
            factor = rs["factor"]
            need(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0,
                 f"config: rope_scaling factor must be a number >= 1, got {factor!r}")

    # ----------------------------------------------------------------- HF I/O
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "InternLM2Config":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type != "internlm2":
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'internlm2'")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: data.get(k, _HF_DEFAULTS.get(k)) for k in known if k in data or k in _HF_DEFAULTS}
        extra = {k: v for k, v in data.items() if k not in known and k != "model_type"}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}".replace(f"{source}: config: ", f"{source}: ")) from None
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: invalid value: {e}") from None

    @classmethod
    def from_json_file(cls, path: str) -> "InternLM2Config":
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: file not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None) -> "InternLM2Config":
        """Reads `config.json` from an HF or jaxlm checkpoint directory, a hub id's snapshot
        (config files only), or returns a preset by name.

        An InternEvo Origin directory has no config.json (its config comes from its shards,
        which this module does not read): `jaxlm.checkpoint.source.model_config` takes it.
        """
        if path in PRESETS:
            return PRESETS[path]
        path = resolve_model_path(path, revision, weights=False)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if os.path.isdir(path) and not os.path.isfile(file):
            origin = os.path.isfile(os.path.join(path, "model_config.pt"))
            raise ConfigError(f"{path}: no config.json in this directory" + (
                " (an InternEvo Origin checkpoint: its config is derived from the shards by "
                "jaxlm.checkpoint.source.model_config)" if origin else ""))
        return cls.from_json_file(file)

    def to_dict(self) -> dict:
        """The HF config.json content, with the keys the original writes."""
        out: dict[str, Any] = {"model_type": "internlm2"}
        out.update({"architectures": ["InternLM2ForCausalLM"]})
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        return out

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")

    def replace(self, **changes) -> "InternLM2Config":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ presets
# Shapes of the released InternLM2 / InternLM2.5 models.
def _preset(hidden, layers, heads, kv_heads, intermediate, rope_scaling):
    return InternLM2Config(
        vocab_size=92544, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, rope_scaling=rope_scaling,
        rope_theta=1_000_000.0, rms_norm_eps=1e-5, bias=False,
        tie_word_embeddings=False, max_position_embeddings=32768,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _dyn(factor):
    return {"type": "dynamic", "factor": factor}


PRESETS: dict[str, InternLM2Config] = {
    "internlm2-1_8b": _preset(2048, 24, 16, 8, 8192, _dyn(2.0)),
    "internlm2-7b": _preset(4096, 32, 32, 8, 14336, None),
    "internlm2-chat-7b": _preset(4096, 32, 32, 8, 14336, _dyn(2.0)),
    "internlm2-20b": _preset(6144, 48, 48, 8, 16384, None),
    "internlm2-chat-20b": _preset(6144, 48, 48, 8, 16384, _dyn(3.0)),
    "internlm2_5-7b-chat": _preset(4096, 32, 32, 8, 14336, _dyn(2.0)),
}

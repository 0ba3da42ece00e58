"""`ModelOptions`: how a model computes, not what it is (that is `InternLM2Config`).

One object travels from ``InternLM2ForCausalLM(...)``, ``from_pretrained``,
the loaders and the training config (``TrainConfig.model``) down to the
layers. Each option's allowed values are listed here, once.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlm.errors import ConfigError

ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable")
CONTEXT_ATTENTION = ("allgather", "ring", "xla")   # prefill on a context axis: jaxlm.nn.context_parallel
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")
QUANTIZE_MODES = ("int8", "int4")   # weight-only quantization of the decoder's matrices: jaxlm.nn.quant


def as_dtype(value, what: str = "dtype", allowed=COMPUTE_DTYPES):
    """``value`` as a NumPy dtype from ``allowed`` (None stays None)."""
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in allowed:
        raise ConfigError(f"{what}: unsupported dtype {value!r}; use one of {', '.join(allowed)}")
    return dtype


def check_cache_dtype(value):
    return as_dtype(value, "kv_cache_dtype", KV_CACHE_DTYPES)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    # dtypes are given by name (or as dtypes) and stored as NumPy dtypes
    dtype: str | None = None             # activations / compute; None: param_dtype
    param_dtype: str | None = None       # stored weights; None: the checkpoint's dtype (new models: float32)
    scan_layers: bool = False            # one stacked layer under lax.scan
    attention_impl: str = "auto"         # ATTENTION_IMPLS
    remat: str = "none"                  # REMAT_POLICIES
    max_context: int | None = None       # longest prompt + new tokens generate accepts
    kv_cache_dtype: str | None = None    # None: the compute dtype; or KV_CACHE_DTYPES
    context_attention: str = "allgather"  # CONTEXT_ATTENTION
    quantize: str | None = None          # None, or QUANTIZE_MODES (a quantized checkpoint sets it)
    quantize_output: bool = False        # with quantize: the output head too (it stays float by default)

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "kv_cache_dtype", check_cache_dtype(self.kv_cache_dtype))
        for name, allowed in (("attention_impl", ATTENTION_IMPLS), ("context_attention", CONTEXT_ATTENTION),
                              ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("scan_layers", "quantize_output"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize must be one of {QUANTIZE_MODES} or None, got {self.quantize!r}")
        if self.max_context is not None and (isinstance(self.max_context, bool)
                                             or not isinstance(self.max_context, int) or self.max_context < 1):
            raise ConfigError(f"max_context must be a positive integer or None, got {self.max_context!r}")

    @classmethod
    def build(cls, options: "ModelOptions | None" = None, **overrides) -> "ModelOptions":
        """``options`` (or the defaults) with ``overrides`` applied; an unknown name is an error."""
        names = [f.name for f in dataclasses.fields(ModelOptions)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(f"unknown model option {unknown[0]!r}; options are {', '.join(names)}")
        base = ModelOptions() if options is None else ModelOptions.of(options)
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def of(cls, obj) -> "ModelOptions":
        """The `ModelOptions` fields of ``obj`` (e.g. a training config's model section)."""
        if type(obj) is ModelOptions:
            return obj
        return ModelOptions(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(ModelOptions)})

    def resolve(self, stored_dtype=jnp.float32) -> "ModelOptions":
        """Concrete dtypes: ``param_dtype`` defaults to ``stored_dtype``, ``dtype`` to ``param_dtype``."""
        param_dtype = self.param_dtype or as_dtype(stored_dtype, "param_dtype")
        return dataclasses.replace(self, param_dtype=param_dtype, dtype=self.dtype or param_dtype)

"""Runtime options of a model: how it computes, not what it is."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxlm.errors import ConfigError

ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable")
CONTEXT_ATTENTION = ("ring", "allgather", "xla")   # prefill on a context axis: jaxlm.nn.context_parallel


def as_dtype(value, what: str = "dtype"):
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ConfigError(f"{what}: unsupported dtype {value!r}; use float32 or bfloat16") from None


def check_cache_dtype(value):
    if value is None:
        return None
    dtype = as_dtype(value, "kv_cache_dtype")
    if dtype.name not in ("float32", "bfloat16", "float16", "int8"):
        raise ConfigError(f"kv_cache_dtype: {dtype} is not supported; use bfloat16, float32 or int8")
    return dtype


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    dtype: object = jnp.float32          # activations / compute
    param_dtype: object = jnp.float32    # stored weights
    scan_layers: bool = False            # one stacked layer under lax.scan
    attention_impl: str = "auto"
    remat: str = "none"
    max_context: int | None = None       # longest prompt + new tokens generate accepts
    kv_cache_dtype: object = None        # None: the compute dtype; or bfloat16, float32, int8
    context_attention: str = "allgather"  # attention on a context mesh axis: allgather, ring or xla

    def __post_init__(self):
        object.__setattr__(self, "dtype", as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "kv_cache_dtype", check_cache_dtype(self.kv_cache_dtype))
        for name, value in (("dtype", self.dtype), ("param_dtype", self.param_dtype)):
            if value not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
                raise ConfigError(f"{name}: unsupported dtype {value}; use float32 or bfloat16")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.context_attention not in CONTEXT_ATTENTION:
            raise ConfigError(f"context_attention must be one of {CONTEXT_ATTENTION}, "
                              f"got {self.context_attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

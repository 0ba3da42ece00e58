"""RMSNorm, computed in float32 as the reference does."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.params import logical_param, ones


class RMSNorm(nnx.Module):
    """``w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(dtype)``."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = logical_param(rngs, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * normed

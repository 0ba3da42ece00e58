"""A named-dimension einsum projection (the kernel keeps structured axes).

Kernels keep the model's structure instead of being flattened to 2-D: the
packed attention projection is ``[embed, kv_heads, slot, head_dim]``, which is
what lets tensor parallelism split it by kv group. qwix-style LoRA and
quantization intercept the ``jnp.einsum`` call made here.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.params import logical_param, normal, zeros


class Einsum(nnx.Module):
    """``y = einsum(spec, x, kernel) (+ bias)``, computed in ``dtype``."""

    def __init__(self, spec: str, kernel_shape: Sequence[int], kernel_axes: Sequence[str],
                 *, bias_shape: Sequence[int] | None = None, bias_axes: Sequence[str] = (),
                 init_std: float = 0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.spec = spec
        self.dtype = dtype
        self.kernel = logical_param(rngs, normal(init_std), kernel_shape, kernel_axes, param_dtype)
        self.bias = (logical_param(rngs, zeros, bias_shape, bias_axes, param_dtype)
                     if bias_shape is not None else None)

    def __call__(self, x):
        y = jnp.einsum(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

"""SwiGLU feed-forward: ``w2(silu(w1 x) * w3 x)``."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.linear import Projection


class SwiGLU(nnx.Module):
    def __init__(self, embed: int, hidden: int, *, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, quantize: str | None = None, rngs: nnx.Rngs):
        kw = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)
        self.w1 = Projection("BTE,ME->BTM", (hidden, embed), ("mlp", "embed"), **kw)  # gate
        self.w3 = Projection("BTE,ME->BTM", (hidden, embed), ("mlp", "embed"), **kw)  # up
        self.w2 = Projection("BTM,EM->BTE", (embed, hidden), ("embed", "mlp"), **kw)  # down

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        k1, k3, k2 = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        return self.w2(jax.nn.silu(self.w1(x, k1)) * self.w3(x, k3), k2)

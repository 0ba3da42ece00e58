"""Token embedding table, usable as a tied output head."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.params import logical_param, normal
from jaxlm.sharding import constrain


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = logical_param(rngs, normal(init_std), (vocab, dim), ("vocab", "embed"),
                                       param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # A gather from a vocab-sharded table is a full rematerialization for the
        # SPMD partitioner; gathering the vocab shards first is one all-gather.
        table = constrain(self.embedding[...], (None, "embed"))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (the tied output head)."""
        return jnp.einsum("BTE,VE->BTV", x, self.embedding[...].astype(self.dtype))

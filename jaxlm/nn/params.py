"""Creating parameters that carry logical axis names.

Every parameter records its logical axes (e.g. ``("embed", "mlp")``) in the
Flax ``out_sharding`` metadata. `jaxlm.sharding` maps those names to mesh
axes through one rules table; ``eager_sharding=False`` keeps Flax from trying
to shard at creation time, before any mesh or rules are known.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def logical_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
                  axes: Sequence[str | None], dtype) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def logical_axes(param: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names recorded on a parameter (stacked layers included)."""
    meta = param.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(axes) if axes is not None else (None,) * jnp.ndim(param.get_value())


def normal(stddev: float) -> Initializer:
    return jax.nn.initializers.normal(stddev)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones

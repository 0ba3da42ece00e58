"""Creating parameters that carry logical axis names.

Every parameter records its logical axes (e.g. ``("embed", "mlp")``) in a
``logical_axes`` metadata field of its own. `jaxlm.sharding` maps those names to
mesh axes through one rules table. (Flax's ``out_sharding`` field is avoided
on purpose: Flax reads it as *mesh* axis names whenever a mesh is active, in
``eval_shape`` and eager sharding, which breaks with logical names.)
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
    return nnx.Param(value, logical_axes=tuple(axes))


def logical_axes(param: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names recorded on a parameter (stacked layers included)."""
    axes = param.get_metadata().get("logical_axes")
    return tuple(axes) if axes is not None else (None,) * jnp.ndim(param.get_value())


def add_leading_axis(module: nnx.Module, name: str) -> None:
    """Records a new leading axis (e.g. stacked ``layers``) on every parameter."""
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        var.set_metadata(logical_axes=(name,) + logical_axes(var)[: jnp.ndim(var.get_value()) - 1])


def normal(stddev: float) -> Initializer:
    return jax.nn.initializers.normal(stddev)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones

"""Logical axis names -> mesh axes: the one rules table of jaxlm.

Parameters carry logical axis names (see `jaxlm.nn.params`); activations are
constrained with `constrain`. Both are translated to mesh axes here, so the
whole layout of a run is decided by `DEFAULT_RULES` (or a user override).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Sequence

import jax
from jax.sharding import PartitionSpec

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axis (or axes). Names absent here are replicated.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", "context"),
    ("head_dim", None),
    ("qkv", None),
    ("norm", None),
    ("layers", None),
)

_state = threading.local()


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    return getattr(_state, "rules", DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, MeshAxes]]):
    """Temporarily replaces the logical-axis rules (e.g. from an experiment config)."""
    previous = current_rules()
    _state.rules = tuple(rules)
    try:
        yield
    finally:
        _state.rules = previous


def _active_mesh_axes() -> tuple[str, ...]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True):
        return ()
    return tuple(mesh.axis_names)


def logical_to_spec(axes: Sequence[str | None], mesh_axes: Sequence[str] | None = None,
                    rules=None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``; mesh axes already used are not reused."""
    rules = dict(current_rules() if rules is None else rules)
    available = set(_active_mesh_axes() if mesh_axes is None else mesh_axes)
    used: set[str] = set()
    spec = []
    for name in axes:
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n in available and n not in used)
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside a mesh."""
    mesh_axes = _active_mesh_axes()
    if not mesh_axes:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh_axes))

"""Meshes, and logical axis names -> mesh axes through one rules table.

Parameters carry logical axis names (see `jaxlm.nn.params`); activations are
constrained with `constrain`. Both are translated to mesh axes here, so the
layout of a run is decided by `DEFAULT_RULES` (or an override installed with
`axis_rules`, e.g. from an experiment config).

A mesh axis that does not divide an array dimension is dropped for that
array (the dimension is replicated instead): a 1000-token vocabulary stays
whole on a 16-way tensor axis rather than failing. Where that leaves more
than 1 MiB per device replicated, a warning says so.

The rules in force are part of what keys every compiled function
(`jit_with_rules`), so changing them takes effect at the next call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import re
import threading
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import ConfigError

log = logging.getLogger("jaxlm.sharding")

MESH_AXES = ("data", "fsdp", "tensor", "context")
MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axis (or axes). Names absent here are replicated.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("qkv", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_cache_length", "context"),
)

# The logical axes of every activation the runtime constrains, by what it holds.
ACT: dict[str, tuple[str | None, ...]] = {
    "tokens": ("act_batch", None),                                        # [B, T] ids, masks, positions
    "rows": ("act_batch",),                                               # [B] lengths, flags
    "hidden": ("act_batch", "act_length", "act_embed"),                   # [B, T, E] residual stream
    "queries": ("act_batch", "act_length", "act_kv_heads", None, None),   # [B, T, K, G, D]
    "decode_queries": ("act_batch", "act_heads", None),                   # [B, H, D] one query per row
    "kv_cache": ("act_batch", "act_cache_length", "act_kv_heads", None),  # [B, S, K, D]
    "kv_scale": ("act_batch", "act_cache_length", "act_kv_heads"),        # [B, S, K] int8 cache scales
    # The serving pool: any row may hold any page, so the page axis is not split over
    # the batch axes (rows read their pages wherever they are); kv heads split as above.
    "kv_pages": (None, None, "act_kv_heads", None),                     # [P, page, K, D]
    "kv_page_scale": (None, None, "act_kv_heads"),                      # [P, page, K] int8 scales
    "replicated": (),                                                   # small per-slot state
    "logits": ("act_batch", "act_length", "act_vocab"),                   # [B, T, V]
}

REPLICATION_WARN_BYTES = 1 << 20   # dropped mesh axes are reported above this much per device

_state = threading.local()


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    return getattr(_state, "rules", DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, MeshAxes]] | dict):
    """Temporarily replaces (or, given a dict, updates) the logical-axis rules."""
    previous = current_rules()
    if isinstance(rules, dict):
        merged = dict(previous)
        merged.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items()})
        rules = tuple(merged.items())
    _state.rules = tuple(rules)
    try:
        yield
    finally:
        _state.rules = previous


def jit_with_rules(fun=None, **jit_kwargs):
    """``jax.jit`` whose compiled programs are keyed on the axis rules in force too.

    The rules are read when a function is traced (by `constrain`, the
    attention dispatch, ...), so they must key the cache like any static
    argument: otherwise changing `axis_rules` after a first call would
    silently reuse the old layout. The wrapper passes the current rules as a
    hidden static argument and installs them while tracing.
    """
    if fun is None:
        return functools.partial(jit_with_rules, **jit_kwargs)
    static = tuple(jit_kwargs.pop("static_argnames", ())) + ("_axis_rules",)

    def traced(*args, _axis_rules, **kwargs):
        with axis_rules(_axis_rules):
            return fun(*args, **kwargs)

    # jit resolves static_argnames / donate_argnames through the signature: give it
    # ``fun``'s, plus the hidden keyword, so positional calls donate by name too.
    sig = inspect.signature(fun)
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter("_axis_rules", inspect.Parameter.KEYWORD_ONLY))
    traced.__signature__ = sig.replace(parameters=params)

    compiled = jax.jit(traced, static_argnames=static, **jit_kwargs)

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return compiled(*args, _axis_rules=current_rules(), **kwargs)

    call.lower = lambda *args, **kwargs: compiled.lower(*args, _axis_rules=current_rules(), **kwargs)
    call.clear_cache = compiled.clear_cache
    call.cache_size = compiled._cache_size
    return call


# --------------------------------------------------------------------- meshes
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes; one of them may be -1 (fills the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1

    @classmethod
    def parse(cls, spec: "str | dict | MeshConfig | None") -> "MeshConfig":
        if spec is None:
            return cls()
        if isinstance(spec, MeshConfig):
            return spec
        if isinstance(spec, dict):
            items = spec
        else:
            items = {}
            for part in filter(None, (p.strip() for p in str(spec).split(","))):
                m = re.fullmatch(r"(\w+)\s*=\s*(-?\d+)", part)
                if not m:
                    raise ConfigError(f"mesh: cannot parse {part!r}; expected e.g. 'fsdp=4,tensor=2'")
                items[m.group(1)] = int(m.group(2))
        unknown = sorted(set(items) - set(MESH_AXES))
        if unknown:
            raise ConfigError(f"mesh: unknown axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
        sizes = {a: int(items.get(a, 1)) for a in MESH_AXES}
        if not any(v == -1 for v in sizes.values()) and "fsdp" not in items:
            sizes["fsdp"] = -1  # unnamed devices go to fsdp
        return cls(**sizes)

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = dataclasses.asdict(self)
        fill = [a for a, v in sizes.items() if v == -1]
        bad = [a for a, v in sizes.items() if v == 0 or v < -1]
        if bad or len(fill) > 1:
            raise ConfigError(f"mesh: sizes must be positive, with at most one -1; got {sizes}")
        known = math.prod(v for v in sizes.values() if v != -1)
        if fill:
            if num_devices % known:
                raise ConfigError(f"mesh: {sizes} does not divide the {num_devices} available devices")
            sizes[fill[0]] = num_devices // known
        total = math.prod(sizes.values())
        if total > num_devices:
            raise ConfigError(f"mesh: {sizes} needs {total} devices, but only {num_devices} are available")
        if total != num_devices:
            raise ConfigError(f"mesh: {sizes} uses {total} of the {num_devices} devices; "
                              f"sizes must multiply to the device count")
        return sizes


def make_mesh(spec: "str | dict | MeshConfig | None" = None, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, context), all ``AxisType.Auto``."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = MeshConfig.parse(spec).resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))


def valid_tensor_sizes(num_kv_heads: int) -> list[int]:
    return [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]


def check_mesh_for_model(mesh, config) -> None:
    """Tensor parallelism splits ``wqkv`` by kv group: ``tensor`` must divide the kv heads."""
    tensor = mesh_sizes(mesh).get("tensor", 1)
    if config.num_key_value_heads % tensor:
        raise ConfigError(
            f"mesh: tensor={tensor} does not divide num_key_value_heads={config.num_key_value_heads} "
            f"(wqkv is split by kv group); valid tensor sizes: "
            f"{', '.join(map(str, valid_tensor_sizes(config.num_key_value_heads)))}")


# ---------------------------------------------------------------- translation
def active_mesh_axes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True):
        return {}
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def _rule_targets(rules, name) -> tuple[str, ...]:
    target = dict(rules).get(name) if name is not None else None
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _resolve(axes, sizes, rules, shape):
    """(spec entries, mesh axes dropped because they do not divide their dimension)."""
    used: set[str] = set()
    spec, dropped = [], []
    for i, name in enumerate(axes):
        chosen, extent = [], 1
        for n in _rule_targets(rules, name):
            if n not in sizes or n in used:
                continue
            size = sizes[n]
            if shape is not None and size is not None and shape[i] % (extent * size):
                if size > 1:
                    dropped.append((n, name, shape[i]))
                continue
            chosen.append(n)
            extent *= size or 1
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return spec, dropped


def logical_to_spec(axes: Sequence[str | None], mesh_axes: "dict[str, int] | Sequence[str] | None" = None,
                    rules=None, shape: Sequence[int] | None = None, dtype=None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``.

    A mesh axis is used at most once, and (when ``shape`` and sizes are known)
    only where it divides the dimension. Given ``dtype`` too, an array left
    replicated that way above `REPLICATION_WARN_BYTES` per device is logged.
    """
    rules = current_rules() if rules is None else rules
    if mesh_axes is None:
        mesh_axes = active_mesh_axes()
    sizes = dict(mesh_axes) if isinstance(mesh_axes, dict) else {a: None for a in mesh_axes}
    spec, dropped = _resolve(axes, sizes, rules, shape)
    if dropped and dtype is not None:
        _warn_replicated(tuple(axes), tuple(shape), dtype, spec, sizes, dropped)
    return PartitionSpec(*spec)


_warned: set = set()


def _warn_replicated(axes, shape, dtype, spec, sizes, dropped) -> None:
    parts = math.prod(sizes[n] or 1 for entry in spec if entry is not None
                      for n in ((entry,) if isinstance(entry, str) else entry))
    per_device = math.prod(shape) * np.dtype(dtype).itemsize / parts
    key = (axes, shape)
    if per_device <= REPLICATION_WARN_BYTES or key in _warned:
        return
    _warned.add(key)
    what = "; ".join(f"mesh axis {n!r} ({sizes[n]}) does not divide {logical!r} ({dim})"
                     for n, logical, dim in dropped)
    log.warning("sharding: an array %s %s with logical axes %s stays replicated along part of its layout "
                "(%.1f MiB per device): %s", shape, np.dtype(dtype).name, axes, per_device / 2**20, what)


def named_sharding(mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   dtype=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, mesh_sizes(mesh), shape=shape, dtype=dtype))


def context_axis(mesh_axes: dict[str, int] | None = None) -> str | None:
    """The mesh axis the cache slots are split over, when the mesh (default: the active one) splits them."""
    sizes = active_mesh_axes() if mesh_axes is None else mesh_axes
    for name in _rule_targets(current_rules(), "act_cache_length"):
        if sizes.get(name, 1) > 1:
            return name
    return None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op outside a mesh."""
    mesh_axes = active_mesh_axes()
    if not mesh_axes or all(v == 1 for v in mesh_axes.values()):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh_axes, shape=x.shape, dtype=x.dtype))


# ------------------------------------------------------------------- batches
def batch_multiple(mesh) -> int:
    """Rows a batch must be a multiple of: the mesh axes the ``batch`` rule uses."""
    if mesh is None:
        return 1
    sizes = mesh_sizes(mesh)
    return math.prod(sizes.get(n, 1) for n in _rule_targets(current_rules(), "act_batch"))


def model_mesh(model) -> Mesh | None:
    """The mesh a model's parameters live on (None when not placed on a mesh)."""
    from flax import nnx

    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
        return None
    return None

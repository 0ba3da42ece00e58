"""Token embedding table, usable as a tied output head."""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from jaxlm.nn.params import logical_param, normal
from jaxlm.sharding import active_mesh_axes, logical_to_spec

# The rows' layout: what `constrain(x, ("act_batch", "act_length", "act_embed"))` gives them.
ROW_AXES = ("act_batch", "act_length")


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = logical_param(rngs, normal(init_std), (vocab, dim), ("vocab", "embed"),
                                       param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Rows ``[..., E]`` of the table: exactly ``jnp.take(table, ids, axis=0)``, on any mesh."""
        table = self.embedding[...]
        ids = jnp.asarray(ids)
        mesh = jax.sharding.get_abstract_mesh()
        mesh_axes = active_mesh_axes()
        if (not mesh_axes or all(v == 1 for v in mesh_axes.values())
                or any(t != AxisType.Auto for t in mesh.axis_types)):  # inside shard_map, or explicit sharding
            return jnp.take(table, ids, axis=0).astype(self.dtype)
        return vocab_parallel_lookup(table, ids, mesh_axes, self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (the tied output head)."""
        return jnp.einsum("BTE,VE->BTV", x, self.embedding[...].astype(self.dtype))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def vocab_parallel_lookup(table: jax.Array, ids: jax.Array, mesh_axes: dict[str, int], dtype) -> jax.Array:
    """``jnp.take(table, ids, axis=0)`` as a `shard_map` over the table's own shards.

    Why: left to the SPMD partitioner, a gather from the table (vocab ->
    tensor, embed -> fsdp) into rows split by batch over (data, fsdp) comes
    out with embed on fsdp, and XLA cannot move fsdp from embed to batch: it
    prints "Involuntary full rematerialization" and replicates the rows (and
    before that, all-gathers the table over tensor).

    Here the table never moves (Megatron's vocab-parallel embedding): each
    device gets the ids of its (data) rows, looks up those that fall in its
    vocab shard, for its embed slice, and writes zeros for the others; a psum
    over the vocab axes adds the one non-zero row per token, and an all-to-all
    over the embed axes trades the embed slices for the (data, fsdp) rows.
    ``x + 0`` is exact and the all-to-all only moves data, so the result is
    bit-identical to ``jnp.take``. Forward traffic: the int ids, and the rows
    twice (psum, all-to-all), never the table. The backward is the same in
    reverse, a local scatter-add into the table shard and the usual
    data-parallel all-reduce of the table gradient over ``data``.

    A one-hot matmul (``one_hot(ids, V) @ table``) would partition too, but it
    costs O(rows x V x E) flops instead of O(rows x E), materializes a
    [rows, V] one-hot, and is exact only at full matmul precision (TPU and
    GPU default to bf16 / TF32 passes): so it is not used.

    Layouts other than the default rules' (an embed axis that is not the
    minor part of the rows' axes, a vocab axis that also splits the rows...)
    take the general route: the table is first gathered over those axes, as
    the partitioner would, and the lookup stays local and exact. When the
    vocab does not divide its axis (the rules drop it), there is no psum.
    """
    vocab = table.shape[0]
    row_names = (ROW_AXES + (None,) * ids.ndim)[:ids.ndim]
    out_spec = logical_to_spec(row_names + ("act_embed",), mesh_axes, shape=ids.shape + table.shape[1:])
    rows = [_axes(e) for e in out_spec[:-1]]
    out_embed = _axes(out_spec[-1])
    used = {a for entry in out_spec for a in _axes(entry)}
    table_spec = logical_to_spec(("vocab", "embed"), mesh_axes, shape=table.shape)
    # A vocab axis that also splits the rows cannot be summed over (it holds other rows): gathered.
    vocab_axes = tuple(a for a in _axes(table_spec[0]) if a not in used)
    embed_axes = _axes(table_spec[1])
    # The embed slices go to the rows by one all-to-all when their axes are the
    # minor part of one row dimension's axes (batch = (data, fsdp), embed = fsdp).
    a2a_dim = next((i for i, r in enumerate(rows) if embed_axes and not out_embed
                    and r[len(r) - len(embed_axes):] == embed_axes), None)
    if a2a_dim is None:
        embed_axes = out_embed  # the general route: the table's embed is resharded to the rows' layout
    in_rows = [r[:len(r) - len(embed_axes)] if i == a2a_dim else r for i, r in enumerate(rows)]
    # jnp.take's index rules: negative ids count from the end, ids out of range give NaN rows.
    ids = jnp.where(ids < 0, ids + vocab, ids)
    in_range = (ids >= 0) & (ids < vocab)

    def local(table, ids):
        if vocab_axes:
            shard = table.shape[0]
            local_ids = ids - jax.lax.axis_index(_entry(vocab_axes)) * shard
            mine = (local_ids >= 0) & (local_ids < shard)
            found = jnp.take(table, jnp.where(mine, local_ids, 0), axis=0).astype(dtype)
            # where, not a multiply by the mask: an inf in another shard's row must not give NaN here
            out = jax.lax.psum(jnp.where(mine[..., None], found, jnp.zeros((), dtype)), _entry(vocab_axes))
        else:
            out = jnp.take(table, ids, axis=0).astype(dtype)
        if a2a_dim is not None:
            out = jax.lax.all_to_all(out, _entry(embed_axes), a2a_dim, out.ndim - 1, tiled=True)
        return out

    out = jax.shard_map(
        local, in_specs=(PartitionSpec(_entry(vocab_axes), _entry(embed_axes)),
                         PartitionSpec(*map(_entry, in_rows))),
        out_specs=out_spec)(table, ids)
    if jnp.issubdtype(out.dtype, jnp.inexact):
        out = jnp.where(in_range[..., None], out, jnp.array(jnp.nan, out.dtype))
    return out

"""Attention when a ``context`` mesh axis splits the sequence over devices.

Each device holds one contiguous shard of the key slots (the KV cache is
``[B, S, K, D]`` split along S) and, during prefill, one shard of the
queries. The ways to attend, by the shape of the work:

- Decode (one query per row), `decode_attention`: each device attends to its
  own cache slots and the partial outputs are merged by log-sum-exp across
  the axis. Only ``[B, H, D]`` outputs travel, never the cache.
- Prefill, ``"allgather"`` (the default), `prefill_attention`: each device
  gathers the layer's K/V along the axis and attends its own queries to it.
- Prefill, ``"ring"``, `prefill_attention`: queries stay put and the K/V
  shards travel around the ring (``ppermute``), n steps for n devices, each
  step's partial result merged by log-sum-exp. A device holds at most two K/V
  shards, and each step's transfer can overlap that step's math.
- ``"xla"``: none of the above; the layout is left to XLA's partitioner,
  which gathers the queries too and repeats the attention on every device.

The attention each device runs on its own shards is passed in as ``local``
by the dispatcher (`jaxlm.nn.attention_plan`), which decides it once for
every path. `benchmarks/context_parallel.py` measures the three (memory per device,
collectives, time); see `benchmarks/RESULTS.md`. These are written as
explicit `shard_map` programs because the partitioner, left alone, does the
redundant work above. Both are differentiable with either attention
implementation (the kernel's log-sum-exp variant has a VJP); training on a
context axis uses the default, the all-gather.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxlm.kernels.common import merge_splits
from jaxlm.nn.attention import AttentionMask
from jaxlm.sharding import ACT, active_mesh_axes, logical_to_spec

# (q, k, v, mask) -> (out [B, T, K, G, D] float32, lse [B, T, K, G]) on one device
LocalPrefill = Callable[..., tuple[jax.Array, jax.Array]]
# (q [B, H, D], k_cache, v_cache, lengths [B]) -> (out [B, H, D] float32, lse [B, H])
LocalDecode = Callable[..., tuple[jax.Array, jax.Array]]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets, from each set's (output, lse).

    ``out [..., G, D]``, ``lse [..., G]``; the same log-sum-exp merge as the
    kernels' split-K (`jaxlm.kernels.common.merge_splits`).
    """
    return merge_splits(jnp.stack([out_a, out_b], axis=-3), jnp.stack([lse_a, lse_b], axis=-2))


# ------------------------------------------------------------------- prefill
def _mask_arrays(mask: AttentionMask, B: int, S: int, batch, axis: str):
    """The mask's arrays, split into those that travel with the query shard and
    those that travel with the key shard, each with its PartitionSpec."""
    P = jax.sharding.PartitionSpec
    offset = jnp.asarray(mask.q_offset, jnp.int32)
    q_side = {"q_offset": (offset, P() if offset.ndim == 0 else P(batch))}
    if mask.key_lengths is not None:
        q_side["key_lengths"] = (mask.key_lengths, P(batch))
    if mask.q_segment is not None:
        q_side["q_segment"] = (mask.q_segment, P(batch, axis))
    kv_side = {}
    if mask.key_valid is not None:
        kv_side["key_valid"] = (jnp.broadcast_to(mask.key_valid.astype(bool), (B, S)), P(batch, axis))
    if mask.kv_segment is not None:
        kv_side["kv_segment"] = (mask.kv_segment, P(batch, axis))
    return q_side, kv_side


def prefill_attention(q, k, v, mask: AttentionMask, axis: str, strategy: str, *, local: LocalPrefill):
    """Attention with queries and keys split over mesh axis ``axis``: ``q [B,T,K,G,D]``, ``k/v [B,S,K,D]``.

    Device i holds query slots ``q_offset + i*T/n + [0, T/n)`` and key slots
    ``i*S/n + [0, S/n)`` (the dispatcher checked that both divide).
    ``strategy`` is "ring" or "allgather".
    """
    sizes = active_mesh_axes()
    n = sizes[axis]
    q_spec = logical_to_spec(ACT["queries"], sizes, shape=q.shape)
    kv_spec = logical_to_spec(ACT["kv_cache"], sizes, shape=k.shape)
    q_side, kv_side = _mask_arrays(mask, q.shape[0], k.shape[1], kv_spec[0], axis)
    values = lambda d: {name: x for name, (x, _) in d.items()}
    specs = lambda d: {name: s for name, (_, s) in d.items()}

    def per_device(q, k, v, qx, kvx):
        first_slot = qx["q_offset"] + jax.lax.axis_index(axis) * q.shape[1]

        def shard_mask(shift, num_keys, kvx):
            # Keys ``shift + [0, num_keys)``: shift the query slots (and lengths)
            # by as much, so the mask reads local key indices.
            lengths = qx.get("key_lengths")
            return AttentionMask(num_keys, mask.causal, first_slot - shift,
                                 None if lengths is None else lengths - shift,
                                 kvx.get("key_valid"), qx.get("q_segment"), kvx.get("kv_segment"))

        if strategy == "allgather":
            gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
            k, v, kvx = gather(k), gather(v), jax.tree.map(gather, kvx)
            return local(q, k, v, shard_mask(0, k.shape[1], kvx))[0].astype(q.dtype)
        return _ring(q, k, v, kvx, shard_mask, axis, n, local)

    return jax.shard_map(per_device, in_specs=(q_spec, kv_spec, kv_spec, specs(q_side), specs(kv_side)),
                         out_specs=q_spec, check_vma=False)(q, k, v, values(q_side), values(kv_side))


def _ring(q, k, v, kvx, shard_mask, axis: str, n: int, local: LocalPrefill):
    """n steps: attend to the K/V shard in hand while passing it to the next device."""
    i = jax.lax.axis_index(axis)
    S_local = k.shape[1]
    perm = [(d, (d + 1) % n) for d in range(n)]

    def attend_shard(j, k, v, kvx):
        return local(q, k, v, shard_mask(j * S_local, S_local, kvx))

    def step(s, carry):
        out, lse, shard = carry
        # Send the shard on before using it: the transfer does not depend on
        # the math, so the scheduler may overlap the two.
        passed = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), shard)
        o, l = attend_shard((i - s) % n, *shard)                  # after s steps we hold shard i - s
        return merge_partials(out, lse, o, l) + (passed,)

    B, T, K, G, D = q.shape
    init = (jnp.zeros((B, T, K, G, D), jnp.float32), jnp.full((B, T, K, G), -jnp.inf, jnp.float32), (k, v, kvx))
    out, lse, shard = jax.lax.fori_loop(0, n - 1, step, init)
    o, l = attend_shard((i - (n - 1)) % n, *shard)
    return merge_partials(out, lse, o, l)[0].astype(q.dtype)


# -------------------------------------------------------------------- decode
def decode_attention(q, k_cache, v_cache, lengths, axis: str, *, local: LocalDecode):
    """Decode with the cache slots split over ``axis``: local attention, then an LSE merge.

    Each device attends to its own slots; the ``[B, H, D]`` partial outputs
    and their log-sum-exps are gathered (small) and merged, never the cache.
    """
    sizes = active_mesh_axes()
    q_spec = logical_to_spec(ACT["decode_queries"], sizes, shape=q.shape)
    cache_spec = logical_to_spec(ACT["kv_cache"], sizes, shape=k_cache.shape)
    len_spec = logical_to_spec(ACT["rows"], sizes, shape=lengths.shape)
    if cache_spec[1] != axis:  # the slots do not divide over the axis: let XLA handle it
        return local(q, k_cache, v_cache, lengths)[0].astype(q.dtype)

    def per_device(q, kc, vc, lengths):
        shard = jax.lax.axis_index(axis)
        local_len = jnp.clip(lengths - shard * kc.shape[1], 0, kc.shape[1])
        out, lse = local(q, kc, vc, local_len)                                # [B, H, D], [B, H]
        outs = jax.lax.all_gather(out.astype(jnp.float32), axis, axis=1)      # [B, n, H, D]
        lses = jax.lax.all_gather(lse, axis, axis=1)                          # [B, n, H]
        return merge_splits(outs, lses)[0].astype(q.dtype)

    return jax.shard_map(per_device, in_specs=(q_spec, cache_spec, cache_spec, len_spec), out_specs=q_spec,
                         check_vma=False)(q, k_cache, v_cache, lengths)

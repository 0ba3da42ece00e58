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

`benchmarks/context_parallel.py` measures the three (memory per device,
collectives, time); see `benchmarks/RESULTS.md`. These are written as
explicit `shard_map` programs because the partitioner, left alone, does the
redundant work above. Both are differentiable with either attention
implementation (the kernel's log-sum-exp variant has a VJP); training on a
context axis uses the default, the all-gather.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.nn.attention import AttentionMask, _flash_args, blockwise_attention, resolve_impl, xla_decode_attention
from jaxlm.sharding import active_mesh_axes, logical_to_spec

STRATEGIES = ("ring", "allgather", "xla")

Q_AXES = ("batch", "length", "act_kv_heads", None, None)        # [B, T, K, G, D]
KV_AXES = ("batch", "cache_length", "act_kv_heads", None)       # [B, S, K, D]


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Softmax attention over the union of two disjoint key sets, from each set's (output, lse)."""
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)            # both empty: weights exp(-inf) = 0
    w_a, w_b = jnp.exp(lse_a - safe), jnp.exp(lse_b - safe)
    return out_a * w_a[..., None] + out_b * w_b[..., None], lse


def partial_attention(q, k, v, mask: AttentionMask, impl: str):
    """``(out [B,T,K,G,D] float32, lse [B,T,K,G])`` of ``q`` against this set of keys."""
    B, T, K, G, D = q.shape
    args = None if resolve_impl(impl) == "xla" else _flash_args(mask, T)
    if args is None:
        return blockwise_attention(q, k, v, mask, return_lse=True)
    from jaxlm.kernels import flash_attention_with_lse

    out, lse = flash_attention_with_lse(q.reshape(B, T, K * G, D), k, v, **args)
    return out.reshape(B, T, K, G, D), lse.reshape(B, T, K, G)


# ------------------------------------------------------------------- prefill
def prefill_attention(q, k, v, mask: AttentionMask, axis: str, impl: str = "xla", strategy: str = "allgather"):
    """Attention with queries and keys split over mesh axis ``axis``: ``q [B,T,K,G,D]``, ``k/v [B,S,K,D]``.

    Device i holds query slots ``q_offset + i*T/n + [0, T/n)`` and key slots
    ``i*S/n + [0, S/n)``. ``strategy`` is "ring" or "allgather". Returns None
    when T or S does not split over the axis (the caller then leaves the
    layout to XLA's partitioner).
    """
    sizes = active_mesh_axes()
    n = sizes.get(axis, 1)
    q_spec = logical_to_spec(Q_AXES, sizes, shape=q.shape)
    kv_spec = logical_to_spec(KV_AXES, sizes, shape=k.shape)
    if n == 1 or q_spec[1] != axis or kv_spec[1] != axis:
        return None
    B, S = q.shape[0], k.shape[1]
    batch = kv_spec[0]
    P = jax.sharding.PartitionSpec

    # The mask's arrays, each with the spec that keeps its rows/slots with the q or k/v shard.
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
    values = lambda d: {name: x for name, (x, _) in d.items()}
    specs = lambda d: {name: s for name, (_, s) in d.items()}

    def local(q, k, v, qx, kvx):
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
            return partial_attention(q, k, v, shard_mask(0, k.shape[1], kvx), impl)[0].astype(q.dtype)
        return _ring(q, k, v, kvx, shard_mask, axis, n, impl)

    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, specs(q_side), specs(kv_side)),
                         out_specs=q_spec, check_vma=False)(q, k, v, values(q_side), values(kv_side))


def _ring(q, k, v, kvx, shard_mask, axis: str, n: int, impl: str):
    """n steps: attend to the K/V shard in hand while passing it to the next device."""
    i = jax.lax.axis_index(axis)
    S_local = k.shape[1]
    perm = [(d, (d + 1) % n) for d in range(n)]

    def attend_shard(j, k, v, kvx):
        return partial_attention(q, k, v, shard_mask(j * S_local, S_local, kvx), impl)

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
def decode_with_lse(q, k_cache, v_cache, lengths, impl):
    """One query per row: ``(out [B, H, D] float32, lse [B, H])``."""
    if resolve_impl(impl) == "xla":
        return xla_decode_attention(q, k_cache, v_cache, lengths, return_lse=True)
    from jaxlm.kernels import decode_attention as decode_kernel

    return decode_kernel(q, k_cache, v_cache, lengths, return_lse=True)


def decode_attention(q, k_cache, v_cache, lengths, axis: str, impl: str = "xla"):
    """Decode with the cache slots split over ``axis``: local attention, then an LSE merge."""
    sizes = active_mesh_axes()
    q_spec = logical_to_spec(("batch", "act_heads", None), sizes, shape=q.shape)
    cache_spec = logical_to_spec(KV_AXES, sizes, shape=k_cache.shape)
    len_spec = logical_to_spec(("batch",), sizes, shape=lengths.shape)
    if cache_spec[1] != axis:  # the slots do not divide over the axis: let XLA handle it
        return decode_with_lse(q, k_cache, v_cache, lengths, impl)[0].astype(q.dtype)

    def local(q, kc, vc, lengths):
        shard = jax.lax.axis_index(axis)
        local_len = jnp.clip(lengths - shard * kc.shape[1], 0, kc.shape[1])
        out, lse = decode_with_lse(q, kc, vc, local_len, impl)               # [B, H, D], [B, H]
        m = jax.lax.pmax(lse, axis)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w = jnp.exp(lse - m)                                                    # 0 for an empty shard
        total = jax.lax.psum(w, axis)
        return (jax.lax.psum(w[..., None] * out.astype(jnp.float32), axis) / total[..., None]).astype(q.dtype)

    return jax.shard_map(local, in_specs=(q_spec, cache_spec, cache_spec, len_spec), out_specs=q_spec,
                         check_vma=False)(q, k_cache, v_cache, lengths)

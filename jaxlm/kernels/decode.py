"""``decode_attention``: one new query per sequence against a long KV cache.

Split-K (flash-decoding): the cache is cut into splits processed in
parallel, each producing a partial output and its log-sum-exp; the splits are
merged by log-sum-exp afterwards, so a single 200K-token sequence still
spreads over the whole chip. The query heads of a kv group are processed
together, so each cache block is read once per group, not once per head.

GPU (Triton): grid (batch, kv head, split); the group's G queries form one
``[G, D]`` tile (padded to 16 rows for the tensor cores).
TPU (Mosaic): grid (batch, split, block) over caches viewed as
``[B, S, Hkv * D]`` (a free reshape, lane-dense); all heads go through the
MXU at once with a block-diagonal query matrix, trading idle MXU cycles for
never reading a cache block twice. Blocks past a row's length are neither
computed nor copied (the lengths are prefetched into SMEM for the index map).

An int8 cache is read as stored, with its float32 scales (one per token and
kv head): each block is converted in registers/VMEM and its scales multiply
the block's scores (keys) and probabilities (values), which is attention over
the dequantized cache without ever writing it out. On TPU the scales of a
block, ``[bk, Hkv]`` with tokens along sublanes, reach each query row's
``[bk]`` lanes through a one-hot ``[rows, Hkv]`` matmul (no transpose).

The loops here are shared with the paged-cache kernels (`jaxlm.kernels.paged`),
which differ only in where a block comes from.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlm.kernels.common import (MASK_VALUE, block_sizes_for, dot_precision, kernel_family, kernel_head_dim,
                                  merge_splits, pad_axis, pallas_call, round_up)


def check_cache_inputs(name: str, q, k_cache, v_cache, lengths, k_scale, v_scale, rows: int):
    """Clear errors for the decode kernels' operands (caches ``[B or P, S or page, Hkv, D]``)."""
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: expected q [B, Hq, D] and caches [.., .., Hkv, D] of one shape; got "
                         f"q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    B, Hq, D = q.shape
    if Hq % k_cache.shape[2] or k_cache.shape[3] != D:
        raise ValueError(f"{name}: q {q.shape} does not match the caches {k_cache.shape}")
    if lengths.shape != (rows,):
        raise ValueError(f"{name}: lengths must be [B] = ({rows},), got {lengths.shape}")
    if jnp.dtype(k_cache.dtype) == jnp.int8:
        for which, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.shape != k_cache.shape[:3]:
                raise ValueError(f"{name}: an int8 cache needs {which} of shape {k_cache.shape[:3]} (one per token "
                                 f"and kv head), got {None if scale is None else scale.shape}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{name}: k_scale/v_scale are for int8 caches; the caches are {k_cache.dtype}")


def decode_attention(q, k_cache, v_cache, lengths, *, k_scale=None, v_scale=None, sm_scale: float | None = None,
                     block_k: int | None = None, split: int | None = None, interpret=None,
                     backend: str | None = None, return_lse: bool = False):
    """``q [B, Hq, D]``, caches ``[B, S, Hkv, D]``, ``lengths [B]`` -> ``[B, Hq, D]``.

    int8 caches come with ``k_scale``/``v_scale [B, S, Hkv]`` (float32) and are
    dequantized block by block inside the kernel.

    Keys at slots ``>= lengths[b]`` are ignored (a row with length 0 gets zeros
    and, with ``return_lse``, a log-sum-exp of -inf). On CPU the GPU kernel runs
    in interpret mode; ``interpret=pltpu.InterpretParams()`` runs the TPU kernel so.
    ``return_lse=True`` also returns the float32 log-sum-exp ``[B, Hq]`` and a
    float32 output, for merging partial results (context parallelism).
    """
    check_cache_inputs("decode_attention", q, k_cache, v_cache, lengths, k_scale, v_scale, q.shape[0])
    B, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    if k_cache.shape[0] != B:
        raise ValueError(f"decode_attention: q {q.shape} does not match the caches {k_cache.shape}")
    family, interpret = kernel_family(interpret, backend)
    Dk = kernel_head_dim(D)  # zero-padded head dims leave scores and outputs unchanged
    sizes = block_sizes_for(family, Dk)
    bk = block_k or sizes.decode_block_k
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    lengths = lengths.astype(jnp.int32)
    if Dk != D:
        out = decode_attention(pad_axis(q, 2, Dk), pad_axis(k_cache, 3, Dk), pad_axis(v_cache, 3, Dk), lengths,
                               k_scale=k_scale, v_scale=v_scale, sm_scale=scale, block_k=block_k, split=split,
                               interpret=interpret, backend=backend, return_lse=return_lse)
        return (out[0][..., :D], out[1]) if return_lse else out[..., :D]
    if family == "tpu":
        bk = min(round_up(bk, 128), round_up(S, 128))
        split = max(bk, round_up(split or sizes.decode_split, bk))
        out, lse = _decode_tpu(q, k_cache, v_cache, k_scale, v_scale, lengths, scale, bk, split, interpret)
    else:
        bk = min(bk, max(16, pl.next_power_of_2(S)))
        split = min(max(bk, round_up(split or sizes.decode_split, bk)), round_up(S, bk))   # a short cache: 1 split
        out, lse = _decode_gpu(q, k_cache, v_cache, k_scale, v_scale, lengths, scale, bk, split, interpret)
    return (out, lse) if return_lse else out.astype(q.dtype)


# ------------------------------------------------------------------------ GPU
def gpu_attend_blocks(q, length, start, max_blocks, load, *, scale, block_k, precision):
    """Online softmax of ``q [Gp, D]`` over the key blocks from slot ``start`` below ``length`` (at most
    ``max_blocks``); ``load(j, first)`` gives block j's ``(k, v [bk, D], k_scale, v_scale [1, bk] or None,
    slot of its first row)``: a block may be read from an earlier slot (so it ends inside the cache), and
    the keys before ``first`` are then masked, having been counted by the previous block."""
    blocks = jnp.clip(lax.div(length - start + block_k - 1, block_k), 0, max_blocks)

    def body(j, carry):
        acc, m, l = carry
        first = start + j * block_k
        k, v, ks, vs, loaded = load(j, first)
        s = lax.dot_general(q, k.astype(q.dtype), (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale          # [Gp, bk]
        if ks is not None:
            s = s * ks
        slot = loaded + jnp.arange(block_k)
        s = jnp.where(((slot >= first) & (slot < length))[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        pv = p if vs is None else p * vs
        acc = acc * correction[:, None] + lax.dot_general(
            pv.astype(q.dtype), v.astype(q.dtype), (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)
        return acc, m_new, l

    rows = q.shape[0]
    return lax.fori_loop(0, blocks, body, (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
                                           jnp.zeros((rows,), jnp.float32)))


def gpu_write(o_ref, lse_ref, acc, m, l):
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def gpu_params(interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _gpu_kernel(len_ref, q_ref, k_ref, v_ref, *refs, scale, block_k, split, precision, quantized):
    ks_ref, vs_ref, o_ref, lse_ref = refs if quantized else (None, None) + refs
    b, s_i = pl.program_id(0), pl.program_id(2)
    slots = k_ref.shape[0]

    def load(j, first):  # the cache is not padded to the blocks: the last one is read ending at its end
        loaded = jnp.minimum(first, slots - block_k) if slots % block_k else first
        keys = pl.ds(loaded, block_k)
        scales = (ks_ref[keys][None, :], vs_ref[keys][None, :]) if quantized else (None, None)
        return (k_ref[keys, :], v_ref[keys, :]) + scales + (loaded,)

    acc, m, l = gpu_attend_blocks(q_ref[...], len_ref[b], s_i * split, split // block_k, load, scale=scale,
                                  block_k=block_k, precision=precision)
    gpu_write(o_ref, lse_ref, acc, m, l)


def gpu_group_queries(q, Hkv):
    """``q [B, Hq, D]`` -> ``[B, Hkv, Gp, D]``: each kv group's queries, padded to a tensor-core tile (>= 16 rows)."""
    B, Hq, D = q.shape
    G = Hq // Hkv
    return pad_axis(q.reshape(B, Hkv, G, D), 2, max(16, pl.next_power_of_2(G)))


def _decode_gpu(q, k_cache, v_cache, k_scale, v_scale, lengths, scale, block_k, split, interpret):
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    quantized = k_scale is not None
    # Read in place: only a cache shorter than one block is padded (padding copies the whole cache).
    S_in = max(S, block_k)
    n_splits = -(-S_in // split)
    qg = gpu_group_queries(q, Hkv)
    Gp = qg.shape[2]
    caches = [pad_axis(x, 1, S_in) for x in (k_cache, v_cache) + ((k_scale, v_scale) if quantized else ())]
    lens = pad_axis(lengths, 0, max(16, pl.next_power_of_2(B)))
    kernel = functools.partial(_gpu_kernel, scale=scale, block_k=block_k, split=split,
                               precision=dot_precision(q.dtype), quantized=quantized)
    cache_spec = pl.BlockSpec((None, S_in, None, D), lambda b, h, s: (b, 0, h, 0))
    scale_spec = pl.BlockSpec((None, S_in, None), lambda b, h, s: (b, 0, h))
    o_parts, lse_parts = pallas_call(
        kernel,
        grid=(B, Hkv, n_splits),
        in_specs=[pl.BlockSpec(lens.shape, lambda b, h, s: (0,)),
                  pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
                  cache_spec, cache_spec] + [scale_spec] * (2 * quantized),
        out_specs=gpu_out_specs(Gp, D),
        out_shape=gpu_out_shape(B, Hkv, n_splits, Gp, D),
        compiler_params=gpu_params(interpret),
        interpret=interpret,
        name="jaxlm_decode_gpu",
    )(lens, qg, *caches)
    return gpu_merge(o_parts, lse_parts, Hq // Hkv)


def gpu_out_specs(Gp, D):
    return [pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))]


def gpu_out_shape(B, Hkv, n_splits, Gp, D):
    return [jax.ShapeDtypeStruct((B, Hkv, n_splits, Gp, D), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, n_splits, Gp), jnp.float32)]


def gpu_merge(o_parts, lse_parts, G):
    """Split-K parts ``[B, Hkv, n, Gp, ...]`` -> (out ``[B, Hq, D]``, lse ``[B, Hq]``)."""
    B, Hkv, _, _, D = o_parts.shape
    out, lse = merge_splits(o_parts, lse_parts)
    return out[:, :, :G].reshape(B, Hkv * G, D), lse[:, :, :G].reshape(B, Hkv * G)


# ------------------------------------------------------------------------ TPU
def tpu_kernel(*refs, scale, block_k, blocks_per_split, precision, prefetch, quantized):
    """One key block of one split: refs are the ``prefetch`` scalar refs (lengths first), then q
    (``[rows, Hkv*D]`` block-diagonal), for int8 the one-hot row->head matrix, k, v, for int8 their
    scales ``[bk, Hkv]``, the outputs and the scratch accumulators."""
    len_ref, refs = refs[0], refs[prefetch:]
    if quantized:
        q_ref, heads_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, s_i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    first = (s_i * blocks_per_split + j) * block_k
    dtype = q_ref.dtype

    def per_row(scale_ref):  # [bk, Hkv] -> [rows, bk]: each query row gets its kv head's scales
        return lax.dot_general(heads_ref[...], scale_ref[...], (((1,), (1,)), ((), ())),
                               precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(first < length)
    def _compute():
        k, v = k_ref[...], v_ref[...]                                  # [bk, Hkv * D]
        if quantized:  # int8 -> float32 -> compute dtype, as JAX's own TPU paged kernel converts
            k, v = k.astype(jnp.float32).astype(dtype), v.astype(jnp.float32).astype(dtype)
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale  # [Hkv*Gp, bk]
        if quantized:
            s = s * per_row(ks_ref)
        k_pos = first + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(k_pos < length, s, MASK_VALUE)
        m_prev, l_prev = m_sc[:, 0:1], l_sc[:, 0:1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m_prev - m_new)
        l_sc[...] = jnp.broadcast_to(l_prev * correction + p.sum(axis=1, keepdims=True), l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        pv = jnp.where(k_pos < length, p * per_row(vs_ref), 0.0) if quantized else p
        # rows past the length may be a partial edge block's unspecified memory (NaN * 0 is NaN)
        v = jnp.where(lax.broadcasted_iota(jnp.int32, v.shape, 0) < length - first, v, 0)
        acc_sc[...] = acc_sc[...] * correction + lax.dot_general(
            pv.astype(dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        l = l_sc[:, 0:1]
        empty = l == 0.0
        o_ref[...] = acc_sc[...] / jnp.where(empty, 1.0, l)
        lse = jnp.where(empty, -jnp.inf, m_sc[:, 0:1] + jnp.log(jnp.where(empty, 1.0, l)))
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def tpu_call(q, caches, *, index_map, prefetch, n_splits, per_split, block_k, scale, interpret, name):
    """The TPU kernel over ``caches`` (k, v viewed ``[.., block rows, Hkv*D]``, int8 scales ``[.., rows, Hkv]``),
    whose block ``j`` of split ``s`` of row ``b`` is at ``index_map(b, s, j, *prefetch)`` -> (out, lse)."""
    from jax.experimental.pallas import tpu as pltpu

    B, Hq, D = q.shape
    k, v = caches[:2]
    width = k.shape[-1]
    Hkv = width // D
    G = Hq // Hkv
    Gp = round_up(G, 8)
    rows = Hkv * Gp
    quantized = len(caches) == 4
    # block-diagonal queries: row (h, g) holds q[h, g] in head h's D columns
    qg = pad_axis(q.reshape(B, Hkv, G, D), 2, Gp)
    eye = jnp.eye(Hkv, dtype=q.dtype)
    q_bd = jnp.einsum("bhgd,hk->bhgkd", qg, eye).reshape(B, rows, width)
    whole = lambda shape: pl.BlockSpec(shape, lambda b, s, j, *_: (0,) * len(shape))
    kv_spec = pl.BlockSpec((None, block_k, width), index_map)
    specs = [pl.BlockSpec((None, rows, width), lambda b, s, j, *_: (b, 0, 0)), kv_spec, kv_spec]
    operands = [q_bd, k, v]
    if quantized:
        heads = jnp.repeat(jnp.eye(Hkv, dtype=jnp.float32), Gp, axis=0)          # [rows, Hkv] one-hot
        scale_spec = pl.BlockSpec((None, block_k, Hkv), index_map)
        specs = specs[:1] + [whole(heads.shape)] + specs[1:] + [scale_spec, scale_spec]
        operands = operands[:1] + [heads] + operands[1:] + list(caches[2:])
    kernel = functools.partial(tpu_kernel, scale=scale, block_k=block_k, blocks_per_split=per_split,
                               precision=dot_precision(q.dtype), prefetch=len(prefetch), quantized=quantized)
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, n_splits, per_split),
            in_specs=specs,
            out_specs=[pl.BlockSpec((None, None, rows, width), lambda b, s, j, *_: (b, s, 0, 0)),
                       pl.BlockSpec((None, None, rows, 128), lambda b, s, j, *_: (b, s, 0, 0))],
            scratch_shapes=[pltpu.VMEM((rows, 128), jnp.float32), pltpu.VMEM((rows, 128), jnp.float32),
                            pltpu.VMEM((rows, width), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, n_splits, rows, width), jnp.float32),
                   jax.ShapeDtypeStruct((B, n_splits, rows, 128), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(*prefetch, *operands)
    # keep each head's own D columns (the block diagonal), then merge the splits
    o = o_parts.reshape(B, n_splits, Hkv, Gp, Hkv, D)
    o = jnp.einsum("bnhgkd,hk->bhngd", o, jnp.eye(Hkv, dtype=o.dtype))         # [B, Hkv, n, Gp, D]
    lse = lse_parts[..., 0].reshape(B, n_splits, Hkv, Gp).transpose(0, 2, 1, 3)  # [B, Hkv, n, Gp]
    out, lse = merge_splits(o, lse)
    return out[:, :, :G].reshape(B, Hq, D), lse[:, :, :G].reshape(B, Hq)


def _decode_tpu(q, k_cache, v_cache, k_scale, v_scale, lengths, scale, block_k, split, interpret):
    # Read in place: the last block may run past the cache's end (a partial edge block, masked),
    # so the cache is never padded (padding copies all of it).
    B, S, Hkv, D = k_cache.shape
    per_split = split // block_k
    n_splits = -(-S // split)
    caches = [k_cache.reshape(B, S, Hkv * D), v_cache.reshape(B, S, Hkv * D)] + (
        [k_scale, v_scale] if k_scale is not None else [])

    def kv_map(b, s, j, lens):  # blocks past the length re-use the last needed one: no copy
        last = jnp.maximum(lax.div(lens[b] + block_k - 1, block_k) - 1, 0)
        return b, jnp.minimum(s * per_split + j, last), 0

    return tpu_call(q, caches, index_map=kv_map, prefetch=(lengths,), n_splits=n_splits,
                    per_split=per_split, block_k=block_k, scale=scale, interpret=interpret, name="jaxlm_decode_tpu")

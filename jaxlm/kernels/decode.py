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


def decode_attention(q, k_cache, v_cache, lengths, *, sm_scale: float | None = None, block_k: int | None = None,
                     split: int | None = None, interpret=None, backend: str | None = None,
                     return_lse: bool = False):
    """``q [B, Hq, D]``, caches ``[B, S, Hkv, D]``, ``lengths [B]`` -> ``[B, Hq, D]``.

    Keys at slots ``>= lengths[b]`` are ignored (a row with length 0 gets zeros
    and, with ``return_lse``, a log-sum-exp of -inf). On CPU the GPU kernel runs
    in interpret mode; ``interpret=pltpu.InterpretParams()`` runs the TPU kernel so.
    ``return_lse=True`` also returns the float32 log-sum-exp ``[B, Hq]`` and a
    float32 output, for merging partial results (context parallelism).
    """
    if q.ndim != 3 or k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: expected q [B, Hq, D] and caches [B, S, Hkv, D]; got "
                         f"q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    B, Hq, D = q.shape
    _, S, Hkv, _ = k_cache.shape
    if Hq % Hkv or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: q {q.shape} does not match the caches {k_cache.shape}")
    if lengths.shape != (B,):
        raise ValueError(f"decode_attention: lengths must be [B] = ({B},), got {lengths.shape}")
    family, interpret = kernel_family(interpret, backend)
    Dk = kernel_head_dim(D)  # zero-padded head dims leave scores and outputs unchanged
    sizes = block_sizes_for(family, Dk)
    bk = block_k or sizes.decode_block_k
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    lengths = lengths.astype(jnp.int32)
    if Dk != D:
        out = decode_attention(pad_axis(q, 2, Dk), pad_axis(k_cache, 3, Dk), pad_axis(v_cache, 3, Dk), lengths,
                               sm_scale=scale, block_k=block_k, split=split, interpret=interpret,
                               backend=backend, return_lse=return_lse)
        return (out[0][..., :D], out[1]) if return_lse else out[..., :D]
    if family == "tpu":
        bk = min(round_up(bk, 128), round_up(S, 128))
        split = max(bk, round_up(split or sizes.decode_split, bk))
        out, lse = _decode_tpu(q, k_cache, v_cache, lengths, scale, bk, split, interpret)
    else:
        bk = min(bk, max(16, pl.next_power_of_2(S)))
        split = max(bk, round_up(split or sizes.decode_split, bk))
        out, lse = _decode_gpu(q, k_cache, v_cache, lengths, scale, bk, split, interpret)
    return (out, lse) if return_lse else out.astype(q.dtype)


# ------------------------------------------------------------------------ GPU
def _gpu_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, split, precision):
    b, s_i = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    q = q_ref[...]                                                    # [Gp, D]
    start = s_i * split
    blocks = jnp.clip(lax.div(length - start + block_k - 1, block_k), 0, split // block_k)

    def body(j, carry):
        acc, m, l = carry
        first = start + j * block_k
        ks = pl.ds(first, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale          # [Gp, bk]
        s = jnp.where((first + jnp.arange(block_k) < length)[None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[:, None] + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)
        return acc, m_new, l

    rows = q.shape[0]
    acc, m, l = lax.fori_loop(0, blocks, body, (jnp.zeros(q.shape, jnp.float32),
                                                jnp.full((rows,), MASK_VALUE, jnp.float32),
                                                jnp.zeros((rows,), jnp.float32)))
    empty = l == 0.0
    o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _decode_gpu(q, k_cache, v_cache, lengths, scale, block_k, split, interpret):
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    Gp = max(16, pl.next_power_of_2(G))  # tensor-core tiles need >= 16 rows
    S_pad = round_up(S, split)
    n_splits = S_pad // split
    qg = pad_axis(q.reshape(B, Hkv, G, D), 2, Gp)
    kc, vc = pad_axis(k_cache, 1, S_pad), pad_axis(v_cache, 1, S_pad)
    lens = pad_axis(lengths, 0, max(16, pl.next_power_of_2(B)))
    kernel = functools.partial(_gpu_kernel, scale=scale, block_k=block_k, split=split,
                               precision=dot_precision(q.dtype))
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    o_parts, lse_parts = pallas_call(
        kernel,
        grid=(B, Hkv, n_splits),
        in_specs=[pl.BlockSpec(lens.shape, lambda b, h, s: (0,)),
                  pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
                  pl.BlockSpec((None, S_pad, None, D), lambda b, h, s: (b, 0, h, 0)),
                  pl.BlockSpec((None, S_pad, None, D), lambda b, h, s: (b, 0, h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, n_splits, Gp, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, n_splits, Gp), jnp.float32)],
        compiler_params=params,
        interpret=interpret,
        name="jaxlm_decode_gpu",
    )(lens, qg, kc, vc)
    out, lse = merge_splits(o_parts, lse_parts)
    return out[:, :, :G].reshape(B, Hq, D), lse[:, :, :G].reshape(B, Hq)


# ------------------------------------------------------------------------ TPU
def _tpu_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, block_k,
                blocks_per_split, precision):
    b, s_i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    first = (s_i * blocks_per_split + j) * block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(first < length)
    def _compute():
        k, v = k_ref[...], v_ref[...]                                  # [bk, Hkv * D]
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale  # [Hkv*Gp, bk]
        k_pos = first + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(k_pos < length, s, MASK_VALUE)
        m_prev, l_prev = m_sc[:, 0:1], l_sc[:, 0:1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m_prev - m_new)
        l_sc[...] = jnp.broadcast_to(l_prev * correction + p.sum(axis=1, keepdims=True), l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        acc_sc[...] = acc_sc[...] * correction + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        l = l_sc[:, 0:1]
        empty = l == 0.0
        o_ref[...] = acc_sc[...] / jnp.where(empty, 1.0, l)
        lse = jnp.where(empty, -jnp.inf, m_sc[:, 0:1] + jnp.log(jnp.where(empty, 1.0, l)))
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _decode_tpu(q, k_cache, v_cache, lengths, scale, block_k, split, interpret):
    from jax.experimental.pallas import tpu as pltpu

    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    Gp = round_up(G, 8)
    rows, width = Hkv * Gp, Hkv * D
    S_pad = round_up(S, split)
    n_splits, per_split = S_pad // split, split // block_k
    # block-diagonal queries: row (h, g) holds q[h, g] in head h's D columns
    qg = pad_axis(q.reshape(B, Hkv, G, D), 2, Gp)
    eye = jnp.eye(Hkv, dtype=q.dtype)
    q_bd = jnp.einsum("bhgd,hk->bhgkd", qg, eye).reshape(B, rows, width)
    kc = pad_axis(k_cache, 1, S_pad).reshape(B, S_pad, width)
    vc = pad_axis(v_cache, 1, S_pad).reshape(B, S_pad, width)

    def kv_map(b, s, j, lens):  # blocks past the length re-use the last needed one: no copy
        last = jnp.maximum(lax.div(lens[b] + block_k - 1, block_k) - 1, 0)
        return b, jnp.minimum(s * per_split + j, last), 0

    kernel = functools.partial(_tpu_kernel, scale=scale, block_k=block_k, blocks_per_split=per_split,
                               precision=dot_precision(q.dtype))
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, n_splits, per_split),
            in_specs=[pl.BlockSpec((None, rows, width), lambda b, s, j, lens: (b, 0, 0)),
                      pl.BlockSpec((None, block_k, width), kv_map),
                      pl.BlockSpec((None, block_k, width), kv_map)],
            out_specs=[pl.BlockSpec((None, None, rows, width), lambda b, s, j, lens: (b, s, 0, 0)),
                       pl.BlockSpec((None, None, rows, 128), lambda b, s, j, lens: (b, s, 0, 0))],
            scratch_shapes=[pltpu.VMEM((rows, 128), jnp.float32), pltpu.VMEM((rows, 128), jnp.float32),
                            pltpu.VMEM((rows, width), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, n_splits, rows, width), jnp.float32),
                   jax.ShapeDtypeStruct((B, n_splits, rows, 128), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxlm_decode_tpu",
    )(lengths, q_bd, kc, vc)
    # keep each head's own D columns (the block diagonal), then merge the splits
    o = o_parts.reshape(B, n_splits, Hkv, Gp, Hkv, D)
    o = jnp.einsum("bnhgkd,hk->bhngd", o, jnp.eye(Hkv, dtype=o.dtype))         # [B, Hkv, n, Gp, D]
    lse = lse_parts[..., 0].reshape(B, n_splits, Hkv, Gp).transpose(0, 2, 1, 3)  # [B, Hkv, n, Gp]
    out, lse = merge_splits(o, lse)
    return out[:, :, :G].reshape(B, Hq, D), lse[:, :, :G].reshape(B, Hq)

"""Flash attention for TPU: Pallas kernels with the Mosaic lowering.

Heads-major layout ``[B, H, T, D]`` (the wrapper transposes), blocks that are
multiples of 128, and the key loop as the innermost, sequential grid axis
with the online-softmax state (m, l, acc) in VMEM scratch. A query block
past a key block's causal reach skips its compute, and its key index map is
clamped so the skipped blocks are not even copied in.

Per-row statistics (lse, delta) and segment ids are kept lane-broadcast
(``[..., 128]`` / ``[8, ...]``), the shapes Mosaic tiles natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxlm.kernels.common import MASK_VALUE, dot_precision

LANES, SUBLANES = 128, 8


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _last_key_block(qi, *, block_q, block_k, num_k, causal, offset):  # offset may be traced
    if not causal:
        return num_k - 1
    # lax.div: the operands are non-negative, and `//` would lower through sign()
    return jnp.clip(lax.div(qi * block_q + block_q - 1 + offset, block_k), 0, num_k - 1)


def _first_query_block(kj, *, block_q, block_k, causal, offset):
    if not causal:
        return 0
    return lax.div(jnp.maximum(kj * block_k - offset, 0), block_q)


def _scores_mask(qi, kj, shape, *, causal, offset, kv_len, block_q, block_k, qseg_ref, kseg_ref):
    q_pos = qi * block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = k_pos < kv_len
    if causal:
        mask = mask & (k_pos <= q_pos + offset)
    if qseg_ref is not None:
        mask = mask & (qseg_ref[:, 0:1] == kseg_ref[0:1, :])
    return mask


def _nt(a, b, precision):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _nn(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _seg_inputs(q_seg, k_seg):
    if q_seg is None:
        return None, None
    B, T = q_seg.shape
    S = k_seg.shape[1]
    return (jnp.broadcast_to(q_seg[:, :, None], (B, T, LANES)),
            jnp.broadcast_to(k_seg[:, None, :], (B, SUBLANES, S)))


# --------------------------------------------------------------------- forward
def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale,
                causal, kv_len, block_q, block_k, num_k, precision):
    qi, kj = pl.program_id(2), pl.program_id(3)
    offset = off_ref[0]

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    last = _last_key_block(qi, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal, offset=offset)

    @pl.when(kj <= last)
    def _compute():
        s = _nt(q_ref[...], k_ref[...], precision) * scale                     # [bq, bk]
        mask = _scores_mask(qi, kj, s.shape, causal=causal, offset=offset, kv_len=kv_len,
                            block_q=block_q, block_k=block_k, qseg_ref=qseg_ref, kseg_ref=kseg_ref)
        s = jnp.where(mask, s, MASK_VALUE)
        m_prev, l_prev = m_sc[:, 0:1], l_sc[:, 0:1]                             # [bq, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m_prev - m_new)
        l_new = l_prev * correction + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * correction + _nn(p.astype(v.dtype), v, precision)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(kj == num_k - 1)
    def _finish():
        l = l_sc[:, 0:1]
        l = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(m_sc[:, 0:1] + jnp.log(l), lse_ref.shape)


def _offset_array(offset):
    return jnp.asarray(offset, jnp.int32).reshape(-1)[:1]


def forward(q, k, v, q_seg, k_seg, *, scale, causal, offset, kv_len, block_q, block_k, interpret):
    """Padded ``[B, T, H, D]`` inputs -> (out ``[B, T, Hq, D]``, lse ``[B, Hq, T, 128]``).

    ``offset`` (the key slot of query 0) is prefetched into SMEM, so the index
    maps can skip key blocks past the causal edge even when it is traced.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, num_k = Hq // Hkv, S // block_k
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    qs, ks = _seg_inputs(q_seg, k_seg)
    last = functools.partial(_last_key_block, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal)
    kv_map = lambda b, h, i, j, off: (b, lax.div(h, G), jnp.minimum(j, last(i, offset=off[0])), 0)
    seg_specs = [None, None] if qs is None else [
        pl.BlockSpec((None, block_q, LANES), lambda b, h, i, j, off: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, block_k), lambda b, h, i, j, off: (b, 0, jnp.minimum(j, last(i, offset=off[0]))))]
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, kv_len=kv_len,
                               block_q=block_q, block_k=block_k, num_k=num_k, precision=dot_precision(q.dtype))
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Hq, T // block_q, num_k),
            in_specs=[pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, off: (b, h, i, 0)),
                      pl.BlockSpec((None, None, block_k, D), kv_map),
                      pl.BlockSpec((None, None, block_k, D), kv_map),
                      *seg_specs],
            out_specs=[pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j, off: (b, h, i, 0)),
                       pl.BlockSpec((None, None, block_q, LANES), lambda b, h, i, j, off: (b, h, i, 0))],
            scratch_shapes=[pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
                            pltpu.VMEM((block_q, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, Hq, T, D), q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, T, LANES), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="jaxlm_flash_fwd_tpu",
    )(_offset_array(offset), qh, kh, vh, qs, ks)
    return out.transpose(0, 2, 1, 3), lse


# -------------------------------------------------------------------- backward
def _dq_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               scale, causal, kv_len, block_q, block_k, num_k, precision):
    qi, kj = pl.program_id(2), pl.program_id(3)
    offset = off_ref[0]

    @pl.when(kj == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    last = _last_key_block(qi, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal, offset=offset)

    @pl.when(kj <= last)
    def _compute():
        k, v = k_ref[...], v_ref[...]
        s = _nt(q_ref[...], k, precision) * scale
        mask = _scores_mask(qi, kj, s.shape, causal=causal, offset=offset, kv_len=kv_len,
                            block_q=block_q, block_k=block_k, qseg_ref=qseg_ref, kseg_ref=kseg_ref)
        p = jnp.where(mask, jnp.exp(s - lse_ref[:, 0:1]), 0.0)
        dp = _nt(do_ref[...], v, precision)
        ds = p * (dp - delta_ref[:, 0:1])
        dq_sc[...] += _nn(ds.astype(k.dtype), k, precision)

    @pl.when(kj == num_k - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkdv_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 dk_sc, dv_sc, *, scale, causal, kv_len, block_q, block_k, group, num_q, precision):
    kj, g, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    offset = off_ref[0]

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    first = _first_query_block(kj, block_q=block_q, block_k=block_k, causal=causal, offset=offset)

    @pl.when(qi >= first)
    def _compute():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _nt(q, k, precision) * scale                                       # [bq, bk]
        mask = _scores_mask(qi, kj, s.shape, causal=causal, offset=offset, kv_len=kv_len,
                            block_q=block_q, block_k=block_k, qseg_ref=qseg_ref, kseg_ref=kseg_ref)
        p = jnp.where(mask, jnp.exp(s - lse_ref[:, 0:1]), 0.0)
        dp = _nt(do, v, precision)
        ds = p * (dp - delta_ref[:, 0:1])
        # transposes in float32 (2-D, 128-aligned: native on Mosaic), then NN matmuls
        dv_sc[...] += _nn(p.T.astype(do.dtype), do, precision)
        dk_sc[...] += _nn(ds.T.astype(q.dtype), q, precision)

    @pl.when((g == group - 1) & (qi == num_q - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, k_seg, out, lse, do, *, scale, causal, offset, kv_len, block_q, block_k,
             interpret, d_lse=None):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, num_q, num_k = Hq // Hkv, T // block_q, S // block_k
    precision = dot_precision(q.dtype)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    if d_lse is not None:  # d lse / d s = p: a cotangent g on lse adds g * p to ds = p * (dp - delta)
        delta = delta - d_lse
    delta = jnp.broadcast_to(delta[..., None], delta.shape + (LANES,))
    if lse.shape[2] != T:  # the forward may have run with other blocks on the same padding
        raise ValueError(f"lse length {lse.shape[2]} != {T}")
    qh, kh, vh, doh = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    qs, ks = _seg_inputs(q_seg, k_seg)
    off = _offset_array(offset)
    common = dict(scale=scale, causal=causal, kv_len=kv_len, block_q=block_q, block_k=block_k,
                  precision=precision)

    last = functools.partial(_last_key_block, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal)
    kv_map = lambda b, h, i, j, o: (b, lax.div(h, G), jnp.minimum(j, last(i, offset=o[0])), 0)
    row_map = lambda b, h, i, j, o: (b, h, i, 0)
    seg_specs = [None, None] if qs is None else [
        pl.BlockSpec((None, block_q, LANES), lambda b, h, i, j, o: (b, i, 0)),
        pl.BlockSpec((None, SUBLANES, block_k), lambda b, h, i, j, o: (b, 0, jnp.minimum(j, last(i, offset=o[0]))))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, num_k=num_k, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Hq, num_q, num_k),
            in_specs=[pl.BlockSpec((None, None, block_q, D), row_map),
                      pl.BlockSpec((None, None, block_k, D), kv_map),
                      pl.BlockSpec((None, None, block_k, D), kv_map),
                      *seg_specs,
                      pl.BlockSpec((None, None, block_q, D), row_map),
                      pl.BlockSpec((None, None, block_q, LANES), row_map),
                      pl.BlockSpec((None, None, block_q, LANES), row_map)],
            out_specs=pl.BlockSpec((None, None, block_q, D), row_map),
            scratch_shapes=[pltpu.VMEM((block_q, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="jaxlm_flash_dq_tpu",
    )(off, qh, kh, vh, qs, ks, doh, lse, delta)

    first = functools.partial(_first_query_block, block_q=block_q, block_k=block_k, causal=causal)
    q_map = lambda b, h, j, g, i, o: (b, h * G + g, jnp.maximum(i, first(j, offset=o[0])), 0)
    k_map = lambda b, h, j, g, i, o: (b, h, j, 0)
    seg_specs = [None, None] if qs is None else [
        pl.BlockSpec((None, block_q, LANES), lambda b, h, j, g, i, o: (b, jnp.maximum(i, first(j, offset=o[0])), 0)),
        pl.BlockSpec((None, SUBLANES, block_k), lambda b, h, j, g, i, o: (b, 0, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, group=G, num_q=num_q, **common),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Hkv, num_k, G, num_q),
            in_specs=[pl.BlockSpec((None, None, block_q, D), q_map),
                      pl.BlockSpec((None, None, block_k, D), k_map),
                      pl.BlockSpec((None, None, block_k, D), k_map),
                      *seg_specs,
                      pl.BlockSpec((None, None, block_q, D), q_map),
                      pl.BlockSpec((None, None, block_q, LANES), q_map),
                      pl.BlockSpec((None, None, block_q, LANES), q_map)],
            out_specs=[pl.BlockSpec((None, None, block_k, D), k_map), pl.BlockSpec((None, None, block_k, D), k_map)],
            scratch_shapes=[pltpu.VMEM((block_k, D), jnp.float32), pltpu.VMEM((block_k, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="jaxlm_flash_dkdv_tpu",
    )(off, qh, kh, vh, qs, ks, doh, lse, delta)
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(dq), t(dk), t(dv)

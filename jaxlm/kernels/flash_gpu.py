"""Flash attention for GPU: Pallas kernels with the Triton lowering.

Layout ``[B, T, H, D]`` as given (no transposes). Forward: one program per
(batch, query head, query block), looping over key blocks with an online
softmax; a query head reads its kv head's rows (``h // G``) through the
BlockSpec, so K/V are never repeated. Backward (FlashAttention-2): one
kernel for dq per query block, one for dk/dv per (kv head, key block) that
walks the G query heads of the group, so dk/dv come out summed per group.

Inputs arrive padded to block multiples (`jaxlm.kernels.flash`); ``kv_len``
masks the padded keys and ``offset`` (a 1-element array, so chunked prefill
can pass a traced one) is the key slot of query 0 for causality.
On CPU the same kernels run in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlm.kernels.common import MASK_VALUE, dot_precision, pallas_call


def _compiler_params(head_dim: int, interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _mask(q_pos, k_pos, *, causal, offset, kv_len, q_seg=None, k_seg=None):
    mask = (k_pos < kv_len)[None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None] + offset)
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == k_seg[None, :])
    return mask


def _num_key_blocks(q_block_index, *, block_q, block_k, num_k, causal, offset):
    """Key blocks a query block needs: all of them, or up to its causal edge."""
    if not causal:
        return num_k
    last_key = q_block_index * block_q + block_q - 1 + offset
    return jnp.clip(lax.div(last_key, block_k) + 1, 0, num_k)


def _first_query_block(k_block_index, *, block_q, block_k, causal, offset):
    if not causal:
        return 0
    return lax.div(jnp.maximum(k_block_index * block_k - offset, 0), block_q)


def _nt(a, b, precision):  # a @ b.T in float32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _nn(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _tn(a, b, precision):  # a.T @ b
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


# --------------------------------------------------------------------- forward
def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, causal,
                kv_len, block_q, block_k, precision):
    qi = pl.program_id(2)
    offset = off_ref[0]
    q = q_ref[...]                                                    # [bq, D]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    num_k = k_ref.shape[0] // block_k

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(j * block_k, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]                            # [bk, D]
        s = _nt(q, k, precision) * scale                              # [bq, bk]
        mask = _mask(q_pos, j * block_k + jnp.arange(block_k), causal=causal, offset=offset,
                     kv_len=kv_len, q_seg=q_seg, k_seg=None if kseg_ref is None else kseg_ref[ks])
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[:, None] + _nn(p.astype(v.dtype), v, precision)
        return acc, m_new, l

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    upper = _num_key_blocks(qi, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal, offset=offset)
    acc, m, l = lax.fori_loop(0, upper, body, init)
    l = jnp.where(l == 0.0, 1.0, l)  # a query block past every key (causal, T < S never hits this)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _offset_array(offset):
    return jnp.broadcast_to(jnp.asarray(offset, jnp.int32).reshape(-1)[:1], (16,))  # 16: a Triton-sized block


def forward(q, k, v, q_seg, k_seg, *, scale, causal, offset, kv_len, block_q, block_k, interpret):
    """Padded inputs -> (out [B, T, Hq, D], lse [B, Hq, T] float32)."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, kv_len=kv_len,
                               block_q=block_q, block_k=block_k, precision=dot_precision(q.dtype))
    seg_specs = [None, None] if q_seg is None else [
        pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, S), lambda b, h, i: (b, 0))]
    return pallas_call(
        kernel,
        grid=(B, Hq, T // block_q),
        in_specs=[pl.BlockSpec((16,), lambda b, h, i: (0,)),
                  pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
                  pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
                  *seg_specs],
        out_specs=[pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, T), jnp.float32)],
        compiler_params=_compiler_params(D, interpret),
        interpret=interpret,
        name="jaxlm_flash_fwd",
    )(_offset_array(offset), q, k, v, q_seg, k_seg)


# -------------------------------------------------------------------- backward
def _dq_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               causal, kv_len, block_q, block_k, precision):
    qi = pl.program_id(2)
    offset = off_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = qi * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]
    num_k = k_ref.shape[0] // block_k

    def body(j, dq):
        ks = pl.ds(j * block_k, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        s = _nt(q, k, precision) * scale
        mask = _mask(q_pos, j * block_k + jnp.arange(block_k), causal=causal, offset=offset,
                     kv_len=kv_len, q_seg=q_seg, k_seg=None if kseg_ref is None else kseg_ref[ks])
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = _nt(do, v, precision)
        ds = p * (dp - delta[:, None])
        return dq + _nn(ds.astype(k.dtype), k, precision)

    upper = _num_key_blocks(qi, block_q=block_q, block_k=block_k, num_k=num_k, causal=causal, offset=offset)
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                 *, scale, causal, kv_len, block_q, block_k, group, precision):
    h, kj = pl.program_id(1), pl.program_id(2)
    offset = off_ref[0]
    k, v = k_ref[...], v_ref[...]                                    # [bk, D]
    k_pos = kj * block_k + jnp.arange(block_k)
    k_seg = None if kseg_ref is None else kseg_ref[...]
    num_q = q_ref.shape[0] // block_q
    first = _first_query_block(kj, block_q=block_q, block_k=block_k, causal=causal, offset=offset)

    def head_body(g, carry):
        head = h * group + g

        def q_body(i, carry):
            dk, dv = carry
            qs = pl.ds(i * block_q, block_q)
            q, do = q_ref[qs, head, :], do_ref[qs, head, :]           # [bq, D]
            lse, delta = lse_ref[head, qs], delta_ref[head, qs]
            s = _nt(q, k, precision) * scale                          # [bq, bk]
            mask = _mask(i * block_q + jnp.arange(block_q), k_pos, causal=causal, offset=offset,
                         kv_len=kv_len, q_seg=None if qseg_ref is None else qseg_ref[qs], k_seg=k_seg)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            dv = dv + _tn(p.astype(do.dtype), do, precision)
            dp = _nt(do, v, precision)
            ds = p * (dp - delta[:, None])
            dk = dk + _tn(ds.astype(q.dtype), q, precision)
            return dk, dv

        return lax.fori_loop(first, num_q, q_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head_body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, k_seg, out, lse, do, *, scale, causal, offset, kv_len, block_q, block_k,
             interpret, d_lse=None):
    """Padded inputs -> (dq, dk, dv); dk/dv summed over each group's query heads."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    precision = dot_precision(q.dtype)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    if d_lse is not None:  # d lse / d s = p: a cotangent g on lse adds g * p to ds = p * (dp - delta)
        delta = delta - d_lse
    common = dict(scale=scale, causal=causal, kv_len=kv_len, block_q=block_q, block_k=block_k,
                  precision=precision)
    off = _offset_array(offset)
    has_seg = q_seg is not None

    q_seg_specs = [None, None] if not has_seg else [
        pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)), pl.BlockSpec((None, S), lambda b, h, i: (b, 0))]
    dq = pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(B, Hq, T // block_q),
        in_specs=[pl.BlockSpec((16,), lambda b, h, i: (0,)),
                  pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
                  pl.BlockSpec((None, S, None, D), lambda b, h, i: (b, 0, h // G, 0)),
                  *q_seg_specs,
                  pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
                  pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i)),
                  pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_specs=pl.BlockSpec((None, block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(D, interpret),
        interpret=interpret,
        name="jaxlm_flash_dq",
    )(off, q, k, v, q_seg, k_seg, do, lse, delta)

    kv_seg_specs = [None, None] if not has_seg else [
        pl.BlockSpec((None, T), lambda b, h, j: (b, 0)), pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))]
    dk, dv = pallas_call(
        functools.partial(_dkdv_kernel, group=G, **common),
        grid=(B, Hkv, S // block_k),
        in_specs=[pl.BlockSpec((16,), lambda b, h, j: (0,)),
                  pl.BlockSpec((None, T, Hq, D), lambda b, h, j: (b, 0, 0, 0)),
                  pl.BlockSpec((None, block_k, None, D), lambda b, h, j: (b, j, h, 0)),
                  pl.BlockSpec((None, block_k, None, D), lambda b, h, j: (b, j, h, 0)),
                  *kv_seg_specs,
                  pl.BlockSpec((None, T, Hq, D), lambda b, h, j: (b, 0, 0, 0)),
                  pl.BlockSpec((None, Hq, T), lambda b, h, j: (b, 0, 0)),
                  pl.BlockSpec((None, Hq, T), lambda b, h, j: (b, 0, 0))],
        out_specs=[pl.BlockSpec((None, block_k, None, D), lambda b, h, j: (b, j, h, 0)),
                   pl.BlockSpec((None, block_k, None, D), lambda b, h, j: (b, j, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(D, interpret),
        interpret=interpret,
        name="jaxlm_flash_dkdv",
    )(off, q, k, v, q_seg, k_seg, do, lse, delta)
    return dq, dk, dv

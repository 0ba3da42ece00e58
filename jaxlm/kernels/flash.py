"""``flash_attention``: the public entry point, with a Pallas backward (custom_vjp).

Pads T and S up to block multiples (masking the padded keys), picks the
backend's kernels (GPU/Triton, TPU/Mosaic, or the GPU kernels in interpret
mode on CPU), and slices the padding off again.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxlm.kernels import flash_gpu, flash_tpu
from jaxlm.kernels.common import (BlockSizes, block_sizes_for, check_inputs, kernel_family, kernel_head_dim,
                                  pad_axis, round_up)


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                    block_sizes: BlockSizes | dict | None = None, interpret=None, backend: str | None = None,
                    q_offset=None, kv_segment_ids=None):
    """Flash attention: ``q [B, T, Hq, D]``, ``k, v [B, S, Hkv, D]`` -> ``[B, T, Hq, D]``.

    GQA inside the kernel (query head ``i`` reads kv head ``i // (Hq / Hkv)``);
    head dims 64, 128 and 256 are tiled as they are, smaller ones zero-padded to 64;
    causal allows ``T <= S`` aligned at the end (query ``i`` sees keys
    ``<= i + S - T``); ``segment_ids [B, T]`` (T == S) keeps attention inside
    packed examples. float32 or bfloat16 in, float32 accumulation. On CPU the
    kernels run in interpret mode (``interpret=None``); pass
    ``jax.experimental.pallas.tpu.InterpretParams()`` to run the TPU kernels so.

    For chunked prefill against a cache, ``q_offset`` (may be traced) sets the
    key slot of query 0 instead of ``S - T``, and ``kv_segment_ids [B, S]``
    pairs with ``segment_ids [B, T]`` when T != S.
    """
    args = _prepare(q, k, v, causal, segment_ids, sm_scale, block_sizes, interpret, backend, q_offset,
                    kv_segment_ids)
    return _flash(*args)[..., :q.shape[-1]]


def flash_attention_with_lse(q, k, v, **kwargs):
    """``(out [B, T, Hq, D] float32, lse [B, T, Hq] float32)``; same arguments as `flash_attention`.

    The log-sum-exp lets partial results over disjoint key sets be merged
    exactly (ring attention); a row that reads no key gets lse <= MASK_VALUE +
    log(S), so it weighs nothing there. Differentiable in both outputs: the
    lse cotangent folds into the backward kernels' row term (delta).
    """
    args = _prepare(q, k, v, **kwargs)
    out, lse = _flash_lse(*args)
    return out[..., :q.shape[-1]].astype(jnp.float32), lse


def _lse_rows(lse, T):
    """Kernel lse (GPU ``[B, Hq, T_pad]``, TPU ``[B, Hq, T_pad, 128]``) -> ``[B, T, Hq]``."""
    if lse.ndim == 4:  # the TPU kernel keeps a 128-lane copy
        lse = lse[..., 0]
    return jnp.swapaxes(lse, 1, 2)[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash_lse(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret):
    return _flash_lse_fwd(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret)[0]


def _flash_lse_fwd(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret):
    out, residuals = _forward(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret)
    return (out, _lse_rows(residuals[-1], q.shape[1])), (residuals, q.shape[1], k.shape[1])


def _flash_lse_bwd(causal, scale, sizes, family, interpret, saved, cotangents):
    d_out, d_lse = cotangents
    T_pad = saved[0][0].shape[1]                                                         # the padded q
    d_lse = pad_axis(jnp.swapaxes(d_lse.astype(jnp.float32), 1, 2), 2, T_pad)           # [B, Hq, T_pad]
    return _backward(saved, d_out, causal, scale, sizes, family, interpret, d_lse)


_flash_lse.defvjp(_flash_lse_fwd, _flash_lse_bwd)


def _prepare(q, k, v, causal=True, segment_ids=None, sm_scale=None, block_sizes=None, interpret=None,
             backend=None, q_offset=None, kv_segment_ids=None):
    """Checked, head-padded operands and the static kernel choices, in `_flash`'s argument order."""
    check_inputs(q, k, v, segment_ids if kv_segment_ids is None else None, causal and q_offset is None)
    family, interpret = kernel_family(interpret, backend)
    D = q.shape[-1]
    Dk = kernel_head_dim(D)  # zero-padding the head dim leaves scores and outputs unchanged
    sizes = block_sizes_for(family, Dk, block_sizes)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_seg = seg if kv_segment_ids is None or seg is None else kv_segment_ids.astype(jnp.int32)
    offset = jnp.asarray(k.shape[1] - q.shape[1] if q_offset is None else q_offset, jnp.int32)
    q, k, v = (pad_axis(x, 3, Dk) for x in (q, k, v))
    return q, k, v, seg, kv_seg, offset, causal, float(scale), sizes, family, interpret


def _plan(T, S, sizes: BlockSizes, family: str, backward: bool):
    bq = sizes.block_q_bwd if backward else sizes.block_q
    bk = sizes.block_k_bwd if backward else sizes.block_k
    unit = 128 if family == "tpu" else 16
    bq = min(bq, round_up(T, unit))
    bk = min(bk, round_up(S, unit))
    return bq, bk, round_up(T, bq), round_up(S, bk)


def _pad(q, k, v, seg, kv_seg, T_pad, S_pad):
    q = pad_axis(q, 1, T_pad)
    k, v = pad_axis(k, 1, S_pad), pad_axis(v, 1, S_pad)
    if seg is None:
        return q, k, v, None, None
    return q, k, v, pad_axis(seg, 1, T_pad, -1), pad_axis(kv_seg, 1, S_pad, -2)


def _module(family):
    return flash_tpu if family == "tpu" else flash_gpu


def _forward(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret):
    T, S = q.shape[1], k.shape[1]
    # The backward reuses the padded layout, so pad once to a multiple of both tilings.
    bq, bk, _, _ = _plan(T, S, sizes, family, False)
    bq2, bk2, _, _ = _plan(T, S, sizes, family, True)
    T_pad, S_pad = round_up(T, math.lcm(bq, bq2)), round_up(S, math.lcm(bk, bk2))
    qp, kp, vp, qs, ks = _pad(q, k, v, seg, kv_seg, T_pad, S_pad)
    out, lse = _module(family).forward(qp, kp, vp, qs, ks, scale=scale, causal=causal, offset=offset,
                                       kv_len=S, block_q=bq, block_k=bk, interpret=interpret)
    return out[:, :T], (qp, kp, vp, qs, ks, offset, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret):
    return _forward(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret)[0]


def _flash_fwd(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret):
    out, residuals = _forward(q, k, v, seg, kv_seg, offset, causal, scale, sizes, family, interpret)
    return out, (residuals, q.shape[1], k.shape[1])


def _flash_bwd(causal, scale, sizes, family, interpret, saved, d_out):
    return _backward(saved, d_out, causal, scale, sizes, family, interpret)


def _backward(saved, d_out, causal, scale, sizes, family, interpret, d_lse=None):
    (qp, kp, vp, qs, ks, offset, out, lse), T, S = saved
    bq, bk, _, _ = _plan(T, S, sizes, family, True)
    do = pad_axis(d_out, 1, qp.shape[1])
    dq, dk, dv = _module(family).backward(qp, kp, vp, qs, ks, out, lse, do, scale=scale, causal=causal,
                                          offset=offset, kv_len=S, block_q=bq, block_k=bk,
                                          interpret=interpret, d_lse=d_lse)
    return dq[:, :T], dk[:, :S], dv[:, :S], None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

"""``paged_decode_attention``: one new query per row against a paged KV cache, read in place.

The pool is ``[P, page, Hkv, D]`` (our layout, the contiguous cache's
``[.., S, Hkv, D]`` cut into pages) and row ``b`` holds the pages
``block_table[b]`` in order; int8 pools bring float32 scales ``[P, page, Hkv]``
and are dequantized per block inside the kernel. Nothing is gathered into a
contiguous copy: each block is fetched from its page through the block table.

GPU (Triton): the contiguous decode kernel's split-K loop
(`jaxlm.kernels.decode.gpu_attend_blocks`) over blocks of a few pages, each
block gathered from the pool by its page ids (grid: row, kv head, split).
TPU (Mosaic): the contiguous decode kernel's body (`decode.tpu_kernel`) with
one page per grid step, the pool viewed ``[P, page, Hkv * D]`` (lane-dense,
all heads at once) and the block table prefetched into SMEM, where the
index map reads it; pages past a row's length re-use the last one (no copy).

Why our own kernels and not JAX's (jax 0.10.2, evaluated for this):
- ``pallas.ops.gpu.paged_attention`` fits in function (GQA, per-row lengths,
  per-token int8 scales) but wants a head-major pool ``[Hkv, P, page, D]``
  and keeps its split-K partial outputs in the query dtype; our pool layout
  serves the TPU kernel's lane-dense view and the contiguous cache's code. The
  GPU suite times it against this kernel (``benchmarks/gpu/suite.py``).
- ``pallas.ops.tpu.paged_attention`` is head-major too, and takes int8 only
  with scales broadcast to the full head dim (a float32 array 4x the int8
  pool, built every step) and dequantizes to bfloat16 whatever the model's dtype.
- ``pallas.ops.tpu.ragged_paged_attention`` wants K and V interleaved in one
  pool and only a static per-tensor scale (no per-token int8 scales).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxlm.kernels.common import (block_sizes_for, dot_precision, kernel_family, kernel_head_dim, pad_axis,
                                  pallas_call, round_up)
from jaxlm.kernels.decode import (check_cache_inputs, gpu_attend_blocks, gpu_group_queries, gpu_merge,
                                  gpu_out_shape, gpu_out_specs, gpu_params, gpu_write, tpu_call)

NULL_PAGE = 0   # the block-table filler (jaxlm.serving.pages): pages past a row's length are never read


def paged_kernel_misfit(page_size: int, interpret=None, backend: str | None = None) -> str | None:
    """Why the paged kernel cannot take pages of ``page_size`` here, or None when it can."""
    family, _ = kernel_family(interpret, backend)
    if family != "tpu" and (page_size & (page_size - 1)):
        return f"page_size {page_size} is not a power of two (Triton blocks are)"
    return None


def paged_decode_attention(q, k_pages, v_pages, block_table, lengths, *, k_scale=None, v_scale=None,
                           sm_scale: float | None = None, block_k: int | None = None, split: int | None = None,
                           interpret=None, backend: str | None = None, return_lse: bool = False):
    """``q [B, Hq, D]``, pools ``[P, page, Hkv, D]``, ``block_table [B, n]``, ``lengths [B]`` -> ``[B, Hq, D]``.

    Row ``b`` reads slots ``[0, lengths[b])`` of its pages (slot ``t`` is in page
    ``block_table[b, t // page]``); table entries past that are never read. A
    row of length 0 gets zeros (lse -inf). int8 pools come with
    ``k_scale``/``v_scale [P, page, Hkv]``. ``block_k`` (GPU: keys per inner
    step, a multiple of the page) and ``split`` (keys per split) default from
    the block-size table; ``interpret``/``backend`` as in `decode_attention`.
    """
    check_cache_inputs("paged_decode_attention", q, k_pages, v_pages, lengths, k_scale, v_scale, q.shape[0])
    B, Hq, D = q.shape
    page = k_pages.shape[1]
    if block_table.ndim != 2 or block_table.shape[0] != B:
        raise ValueError(f"paged_decode_attention: block_table must be [B, pages per row] with B = {B}, got "
                         f"{block_table.shape}")
    why = paged_kernel_misfit(page, interpret, backend)
    if why:
        raise ValueError(f"paged_decode_attention: {why}")
    family, interpret = kernel_family(interpret, backend)
    Dk = kernel_head_dim(D)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    lengths, block_table = lengths.astype(jnp.int32), block_table.astype(jnp.int32)
    if Dk != D:  # zero-padded head dims leave scores and outputs unchanged (a copy of the pool: small heads only)
        out = paged_decode_attention(pad_axis(q, 2, Dk), pad_axis(k_pages, 3, Dk), pad_axis(v_pages, 3, Dk),
                                     block_table, lengths, k_scale=k_scale, v_scale=v_scale, sm_scale=scale,
                                     block_k=block_k, split=split, interpret=interpret, backend=backend,
                                     return_lse=return_lse)
        return (out[0][..., :D], out[1]) if return_lse else out[..., :D]
    sizes = block_sizes_for(family, Dk)
    scales = (k_scale, v_scale) if k_scale is not None else ()
    if family == "tpu":
        per_split = max(1, (split or sizes.decode_split) // page)
        out, lse = _paged_tpu(q, k_pages, v_pages, scales, block_table, lengths, scale, per_split, interpret)
    else:
        per_block = max(1, (block_k or sizes.decode_block_k) // page)
        per_split = round_up(max(per_block, (split or sizes.decode_split) // page), per_block)
        out, lse = _paged_gpu(q, k_pages, v_pages, scales, block_table, lengths, scale, per_block, per_split,
                              interpret)
    return (out, lse) if return_lse else out.astype(q.dtype)


# ------------------------------------------------------------------------ GPU
def _gpu_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *refs, scale, page, per_block, per_split, precision,
                quantized):
    ks_ref, vs_ref, o_ref, lse_ref = refs if quantized else (None, None) + refs
    b, s_i = pl.program_id(0), pl.program_id(2)
    block_k = per_block * page

    def load(j, first):
        pages = table_ref[pl.ds(j * per_block, per_block)]                         # this block's page ids
        k = k_ref[pages].reshape(block_k, k_ref.shape[-1])
        v = v_ref[pages].reshape(block_k, v_ref.shape[-1])
        if not quantized:
            return k, v, None, None, first
        return k, v, ks_ref[pages].reshape(1, block_k), vs_ref[pages].reshape(1, block_k), first

    acc, m, l = gpu_attend_blocks(q_ref[...], len_ref[b], s_i * per_split * page, per_split // per_block, load,
                                  scale=scale, block_k=block_k, precision=precision)
    gpu_write(o_ref, lse_ref, acc, m, l)


def _paged_gpu(q, k_pages, v_pages, scales, block_table, lengths, scale, per_block, per_split, interpret):
    B, Hq, D = q.shape
    P, page, Hkv, _ = k_pages.shape
    n_splits = -(-block_table.shape[1] // per_split)
    table = pad_axis(block_table, 1, n_splits * per_split, NULL_PAGE).reshape(B, n_splits, per_split)
    qg = gpu_group_queries(q, Hkv)
    Gp = qg.shape[2]
    lens = pad_axis(lengths, 0, max(16, pl.next_power_of_2(B)))
    kernel = functools.partial(_gpu_kernel, scale=scale, page=page, per_block=per_block, per_split=per_split,
                               precision=dot_precision(q.dtype), quantized=bool(scales))
    pool_spec = pl.BlockSpec((P, page, None, D), lambda b, h, s: (0, 0, h, 0))        # one kv head of every page
    scale_spec = pl.BlockSpec((P, page, None), lambda b, h, s: (0, 0, h))
    o_parts, lse_parts = pallas_call(
        kernel,
        grid=(B, Hkv, n_splits),
        in_specs=[pl.BlockSpec(lens.shape, lambda b, h, s: (0,)),
                  pl.BlockSpec((None, None, per_split), lambda b, h, s: (b, s, 0)),
                  pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
                  pool_spec, pool_spec] + [scale_spec] * len(scales),
        out_specs=gpu_out_specs(Gp, D),
        out_shape=gpu_out_shape(B, Hkv, n_splits, Gp, D),
        compiler_params=gpu_params(interpret),
        interpret=interpret,
        name="jaxlm_paged_decode_gpu",
    )(lens, table, qg, k_pages, v_pages, *scales)
    return gpu_merge(o_parts, lse_parts, Hq // Hkv)


# ------------------------------------------------------------------------ TPU
def _paged_tpu(q, k_pages, v_pages, scales, block_table, lengths, scale, per_split, interpret):
    B, n = block_table.shape
    P, page, Hkv, D = k_pages.shape
    n_splits = -(-n // per_split)
    width = n_splits * per_split
    table = pad_axis(block_table, 1, width, NULL_PAGE).reshape(-1)    # 1-D: SMEM pads a 2-D table's rows
    caches = [k_pages.reshape(P, page, Hkv * D), v_pages.reshape(P, page, Hkv * D)] + list(scales)

    def page_map(b, s, j, lens, table):  # pages past the length re-use the last needed one: no copy
        last = jnp.maximum(lax.div(lens[b] + page - 1, page) - 1, 0)
        return table[b * width + jnp.minimum(s * per_split + j, last)], 0, 0

    return tpu_call(q, caches, index_map=page_map, prefetch=(lengths, table), n_splits=n_splits,
                    per_split=per_split, block_k=page, scale=scale, interpret=interpret,
                    name="jaxlm_paged_decode_tpu")

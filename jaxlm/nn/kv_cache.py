"""The per-layer KV cache: contiguous ``(k, v)`` in a float dtype or int8 with scales, or paged.

Layout ``[B, S, K, D]`` (batch, slot, kv head, head dim), sharded by the
logical axes (batch, cache_length, act_kv_heads). The int8 form stores one
float32 scale per token and kv head (``[B, S, K]``, symmetric, max-abs / 127)
and halves the cache of a bfloat16 model. `read` returns the cache as stored
(`KVView`: int8 values and their scales, or pages and a block table), and
attention dequantizes per block where it reads them: the decode kernels and
XLA cores multiply the scales into the scores and probabilities, so no
dequantized copy of the whole cache is made (the int8 cache saves bandwidth,
not only memory). Only the flash prefill kernels still take float keys
(`KVView.dequantized`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.sharding import ACT, constrain

AXES = ACT["kv_cache"]
SCALE_AXES = ACT["kv_scale"]


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.int8


def empty(shape, dtype, lead=()):
    """A zero cache; ``lead`` adds leading axes (stacked layers) with their logical names."""
    full = tuple(s for s, _ in lead) + tuple(shape)
    names = tuple(n for _, n in lead)
    zeros = lambda s, d, axes: constrain(jnp.zeros(s, d), names + axes)
    if is_quantized(dtype):
        return (zeros(full, jnp.int8, AXES), zeros(full, jnp.int8, AXES),
                zeros(full[:-1], jnp.float32, SCALE_AXES), zeros(full[:-1], jnp.float32, SCALE_AXES))
    return zeros(full, dtype, AXES), zeros(full, dtype, AXES)


def for_layers(num_layers: int, shape, dtype, *, stacked: bool):
    """Empty caches of every layer: a list (unrolled layers) or one stacked ``[L, ...]`` cache (scanned)."""
    if stacked:
        return empty(shape, dtype, lead=((num_layers, "layers"),))
    return [empty(shape, dtype) for _ in range(num_layers)]


def quantize(x):
    """Symmetric int8 per token and head: ``x ~ q * scale``."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    q = jnp.round(x32 / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def write(cache, k, v, write_slot):
    """Writes ``k, v [B, T, K, D]`` at per-row slots ``write_slot [B]`` onward."""
    if isinstance(cache, PagedLayerCache):
        return _write_pages(cache, k, v, write_slot)
    rows = jnp.arange(k.shape[0])[:, None]
    slots = write_slot[:, None] + jnp.arange(k.shape[1])[None, :]             # [B, T]
    put = lambda buf, val, axes: constrain(buf.at[rows, slots].set(val.astype(buf.dtype), mode="drop"), axes)
    if len(cache) == 4:
        kc, vc, ks, vs = cache
        (kq, kscale), (vq, vscale) = quantize(k), quantize(v)
        return put(kc, kq, AXES), put(vc, vq, AXES), put(ks, kscale, SCALE_AXES), put(vs, vscale, SCALE_AXES)
    kc, vc = cache
    return put(kc, k, AXES), put(vc, v, AXES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVView:
    """A cache as attention reads it: as stored, nothing dequantized or gathered.

    ``k``/``v`` are ``[B, S, K, D]``, or with ``block_table [B, n]`` a page pool
    ``[P, page, K, D]`` whose row ``b`` holds the pages ``block_table[b]`` in
    order; a float dtype or int8. ``k_scale``/``v_scale`` are the float32
    scales of an int8 cache (``[B, S, K]``, pages ``[P, page, K]``), else None.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    block_table: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def contiguous(self) -> "KVView":
        """The rows' pages gathered into ``[B, n * page, K(, D)]`` (still int8 when quantized): the
        pure-JAX paged path, which every backend can run; the paged kernels read pages in place."""
        if not self.paged:
            return self
        B, n = self.block_table.shape
        gather = lambda x: None if x is None else x[self.block_table].reshape((B, n * x.shape[1]) + x.shape[2:])
        return KVView(gather(self.k), gather(self.v), gather(self.k_scale), gather(self.v_scale))

    def dequantized(self, dtype) -> tuple[jax.Array, jax.Array]:
        """Float ``(k, v) [B, S, K, D]`` in ``dtype``: a full copy, for the attention that takes floats only
        (the flash prefill kernels, cuDNN, context-parallel shards)."""
        kv = self.contiguous()
        if not kv.quantized:
            return kv.k.astype(dtype), kv.v.astype(dtype)
        return _dequantize(kv.k, kv.k_scale, dtype), _dequantize(kv.v, kv.v_scale, dtype)


def read(cache, length: int | None = None) -> KVView:
    """The cache as stored (`KVView`): its first ``length`` slots (all when None; paged: the pool and block table)."""
    if isinstance(cache, PagedLayerCache):
        return KVView(*cache.pages[:2], *cache.pages[2:], block_table=cache.block_table)
    cut = (lambda x: x) if length is None else (lambda x: x[:, :length])
    return KVView(*(cut(x) for x in cache))


def _dequantize(q, scale, dtype):
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


# ---------------------------------------------------------------- paged
NULL_PAGE = 0


class PagedLayerCache:
    """One layer's pages plus the block table of the rows in this call."""

    def __init__(self, pages: tuple, block_table: jax.Array):
        self.pages = pages                # (k, v) or (k, v, k_scale, v_scale), [P, page, K(, D)]
        self.block_table = block_table    # [R, pages_per_row] int32

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]


jax.tree_util.register_pytree_node(
    PagedLayerCache, lambda c: ((c.pages, c.block_table), None), lambda _, xs: PagedLayerCache(*xs))


PAGE_AXES = ACT["kv_pages"]
PAGE_SCALE_AXES = ACT["kv_page_scale"]


def constrain_pages(pages: tuple, *, stacked: bool = False) -> tuple:
    """One layer's pool (or the stacked ``[L, ...]`` pool) constrained to its logical axes:
    kv heads split over the tensor axis, pages whole on every device (a no-op off a mesh)."""
    lead = ("layers",) if stacked else ()
    return tuple(constrain(x, lead + (PAGE_AXES if i < 2 else PAGE_SCALE_AXES)) for i, x in enumerate(pages))


def empty_pages(num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype, *, layers: int = 0) -> tuple:
    """A zero pool of one layer, or of ``layers`` stacked ones (int8 adds per-token-and-head scales)."""
    shape = ((layers,) if layers else ()) + (num_pages, page_size, kv_heads, head_dim)
    if is_quantized(dtype):
        pages = (jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                 jnp.zeros(shape[:-1], jnp.float32), jnp.zeros(shape[:-1], jnp.float32))
    else:
        pages = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return constrain_pages(pages, stacked=bool(layers))


def _locate(cache: PagedLayerCache, write_slot, T: int):
    """(page, offset) ``[R, T]`` of the slots ``write_slot[r] + [0, T)``."""
    slots = write_slot[:, None] + jnp.arange(T)[None, :]
    col = jnp.clip(slots // cache.page_size, 0, cache.block_table.shape[1] - 1)
    page = jnp.take_along_axis(cache.block_table, col, axis=1)
    beyond = slots // cache.page_size >= cache.block_table.shape[1]
    return jnp.where(beyond, NULL_PAGE, page), slots % cache.page_size


def _write_pages(cache: PagedLayerCache, k, v, write_slot) -> PagedLayerCache:
    """Writes ``k, v [R, T, K, D]`` at per-row slots ``write_slot [R]`` onward."""
    page, offset = _locate(cache, write_slot, k.shape[1])
    put = lambda buf, val: buf.at[page, offset].set(val.astype(buf.dtype))
    if len(cache.pages) == 4:
        kp, vp, ks, vs = cache.pages
        (kq, kscale), (vq, vscale) = quantize(k), quantize(v)
        pages = (put(kp, kq), put(vp, vq), put(ks, kscale), put(vs, vscale))
    else:
        pages = (put(cache.pages[0], k), put(cache.pages[1], v))
    return PagedLayerCache(pages, cache.block_table)


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes one token takes in the K and V caches of ``num_layers`` layers, ``kv_heads`` of them
    (per device: the kv heads a device holds); int8 adds each token and head's float32 scale.

    The memory planner's (`jaxlm.plan`) KV cache bytes are this, times the cached tokens and rows.
    """
    if is_quantized(dtype):
        return 2 * num_layers * kv_heads * (head_dim + 4)
    return 2 * num_layers * kv_heads * head_dim * jnp.dtype(dtype).itemsize


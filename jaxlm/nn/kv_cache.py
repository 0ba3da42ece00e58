"""The per-layer KV cache: ``(k, v)`` in a float dtype, or int8 with scales.

Layout ``[B, S, K, D]`` (batch, slot, kv head, head dim), sharded by the
logical axes (batch, cache_length, act_kv_heads). The int8 form stores one
float32 scale per token and kv head (``[B, S, K]``, symmetric, max-abs / 127)
and halves the cache of a bfloat16 model. `read` dequantizes the slots it
returns into the compute dtype before attention runs (on every path today,
XLA and Pallas alike): the int8 cache saves memory, not yet bandwidth.
"""

from __future__ import annotations

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
    rows = jnp.arange(k.shape[0])[:, None]
    slots = write_slot[:, None] + jnp.arange(k.shape[1])[None, :]             # [B, T]
    put = lambda buf, val, axes: constrain(buf.at[rows, slots].set(val.astype(buf.dtype), mode="drop"), axes)
    if len(cache) == 4:
        kc, vc, ks, vs = cache
        (kq, kscale), (vq, vscale) = quantize(k), quantize(v)
        return put(kc, kq, AXES), put(vc, vq, AXES), put(ks, kscale, SCALE_AXES), put(vs, vscale, SCALE_AXES)
    kc, vc = cache
    return put(kc, k, AXES), put(vc, v, AXES)


def read(cache, dtype, length: int | None = None):
    """``(k, v)`` in ``dtype`` (dequantized for int8), the first ``length`` slots."""
    cut = (lambda x: x) if length is None else (lambda x: x[:, :length])
    if len(cache) == 4:
        kc, vc, ks, vs = (cut(x) for x in cache)
        deq = lambda q, s: (q.astype(jnp.float32) * s[..., None]).astype(dtype)
        return deq(kc, ks), deq(vc, vs)
    kc, vc = cache
    return cut(kc).astype(dtype), cut(vc).astype(dtype)


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype) -> int:
    """Bytes one token takes in the K and V caches of ``num_layers`` layers, ``kv_heads`` of them
    (per device: the kv heads a device holds); int8 adds each token and head's float32 scale.

    The memory planner's (`jaxlm.plan`) KV cache bytes are this, times the cached tokens and rows.
    """
    if is_quantized(dtype):
        return 2 * num_layers * kv_heads * (head_dim + 4)
    return 2 * num_layers * kv_heads * head_dim * jnp.dtype(dtype).itemsize


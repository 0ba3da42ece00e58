"""Attention cores and masks, in grouped-query layout.

Queries are ``[B, T, K, G, D]`` (K kv heads, G query heads per kv head) and
keys/values ``[B, S, K, D]``: query head ``k * G + g`` reads kv head ``k``, so
GQA needs no repeated K/V. Scores and softmax are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked row (left padding) then gives a
# uniform softmax instead of NaN, as the reference's finfo.min masking does.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def make_attention_mask(q_len: int, kv_len: int, *, key_valid=None, q_segment=None, kv_segment=None,
                   causal: bool = True, q_offset=0) -> jax.Array:
    """Boolean ``[B or 1, T, S]`` mask; True where a query may read a key.

    Causality is by slot index: query ``t`` sits at slot ``t + q_offset`` of the
    key sequence and reads keys at slots ``<=`` its own. ``q_offset`` may be a
    scalar or a ``[B]`` array.
    """
    mask = jnp.ones((1, q_len, kv_len), bool)
    if causal:
        q_slot = jnp.arange(q_len)[None, :, None] + jnp.reshape(jnp.asarray(q_offset), (-1, 1, 1))
        mask = mask & (jnp.arange(kv_len)[None, None, :] <= q_slot)
    if key_valid is not None:
        mask = mask & key_valid.astype(bool)[:, None, :]
    if q_segment is not None:
        mask = mask & (q_segment[:, :, None] == kv_segment[:, None, :])
    return mask


CAUSAL_BLOCK = 128


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  sm_scale: float | None = None, causal_offset: int | None = None) -> jax.Array:
    """Plain-XLA attention: ``q [B,T,K,G,D]``, ``k/v [B,S,K,D]``, ``mask [B,T,S]``.

    With ``causal_offset`` (a static int: the key slot of query 0 is
    ``causal_offset``), ``mask`` is known to be causal, so query blocks of
    `CAUSAL_BLOCK` skip the keys after their last query: about 40% less work
    at 512 tokens (measured 3.4 vs 5.0 ms per layer on CPU), and smaller
    score buffers.
    """
    T, S = q.shape[1], k.shape[1]
    if causal_offset is None or T < 2 * CAUSAL_BLOCK:
        return _attend(q, k, v, mask, sm_scale)
    outs = []
    for start in range(0, T, CAUSAL_BLOCK):
        end = min(T, start + CAUSAL_BLOCK)
        keys = min(S, causal_offset + end)
        block_mask = None if mask is None else mask[:, start:end, :keys]
        outs.append(_attend(q[:, start:end], k[:, :keys], v[:, :keys], block_mask, sm_scale))
    return jnp.concatenate(outs, axis=1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
            sm_scale: float | None = None) -> jax.Array:
    """Attention over all of ``k``/``v`` (see `xla_attention` for shapes).

    Heads go first and each kv group's queries are flattened to one axis, so
    both matmuls are plain batched GEMMs in their natural output order: the
    only transposes are of q/k/v/out (T*H*D elements), never of the T*S scores.
    """
    B, T, K, G, D = q.shape
    S = k.shape[1]
    scale = sm_scale if sm_scale is not None else D ** -0.5
    qh = q.transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, D)              # [B, K, T*G, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)            # [B, K, S, D]
    scores = jnp.einsum("BKQD,BKSD->BKQS", qh, kh, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(B, K, T, G, S)
    if mask is not None:
        scores = jnp.where(mask[:, None, :, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B, K, T * G, S)
    out = jnp.einsum("BKQS,BKSD->BKQD", probs, vh)                       # [B, K, T*G, D]
    return out.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4)           # [B, T, K, G, D]


def xla_decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                         sm_scale: float | None = None) -> jax.Array:
    """One new query per row against a KV cache: ``q [B, Hq, D]``, caches ``[B, S, Hkv, D]``.

    Keys at slots ``>= lengths[b]`` are ignored. Written as broadcast-multiply
    and reduce rather than matmuls: with one query there is nothing for a
    GEMM to reuse, and this form reads the cache in place, in its own layout
    (a batched matmul would first transpose the whole cache, every step).
    """
    B, Hq, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    G = Hq // K
    scale = sm_scale if sm_scale is not None else D ** -0.5
    qg = q.reshape(B, 1, K, G, D).astype(jnp.float32)
    scores = jnp.sum(qg * k_cache[:, :, :, None, :].astype(jnp.float32), axis=-1) * scale   # [B, S, K, G]
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    scores = jnp.where(valid[:, :, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * v_cache[:, :, :, None, :].astype(jnp.float32), axis=1)  # [B, K, G, D]
    return out.reshape(B, Hq, D).astype(q.dtype)

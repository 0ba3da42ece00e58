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


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  sm_scale: float | None = None) -> jax.Array:
    """Plain-XLA attention: ``q [B,T,K,G,D]``, ``k/v [B,S,K,D]``, ``mask [B,T,S]``."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("BKGTS,BSKD->BTKGD", probs.astype(v.dtype), v)

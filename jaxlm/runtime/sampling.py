"""Logit processing and token selection with HF's semantics and order.

Order as in HF ``generate``: repetition penalty, then (when sampling)
temperature, top-k and top-p, then a categorical draw. Every knob is a traced
value, so changing it does not recompile; only which stages exist is static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
    """The static part: which stages run (each choice compiles once)."""
    do_sample: bool = False
    repetition_penalty: bool = False
    top_k: bool = False
    top_p: bool = False
    record_logits: bool = False   # keep each step's raw logits (output_logits=True)


def repetition_penalty(logits, seen, penalty):
    """HF's RepetitionPenaltyLogitsProcessor over ``seen [B, V]`` (bool)."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def _order_keys(x):
    """int32 keys ordered as the float32 values ``x`` (-inf and +inf included)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _largest_threshold(keys, weights, target):
    """Per row, the largest key ``t`` with ``sum(weights[keys >= t]) >= target``.

    Bisection over the int32 keys (32 halvings of the key range, exact) instead
    of a sort: the filters need only the cut-off value, and XLA:CPU sorts a
    92,544-entry vocabulary row in tens of milliseconds, which made a top-p
    request's decode step several times slower than a greedy one.
    ``sum(weights) >= target`` must hold (the lowest key qualifies).
    """
    lo = jnp.min(keys, axis=-1)                                 # qualifies: every weight counts
    hi = jnp.max(keys, axis=-1)

    def mass(t):
        return jnp.sum(jnp.where(keys >= t[:, None], weights, 0), axis=-1)

    def halve(_, bounds):
        lo, hi = bounds                                         # mass(lo) >= target; mass(hi) < target
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)             # floor((lo + hi) / 2) without overflow
        ok = mass(mid) >= target
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(mass(hi) >= target, hi, lo)                # the largest key itself may qualify


def top_k_filter(logits, k):
    """Keeps logits >= the k-th largest (ties kept, as HF does); ``k`` is one value or one per row."""
    k = jnp.broadcast_to(jnp.clip(k, 1, logits.shape[-1]), logits.shape[:1])
    keys = _order_keys(logits)
    kth = _largest_threshold(keys, jnp.ones_like(keys), k)
    return jnp.where(keys < kth[:, None], NEG_INF, logits)


def top_p_filter(logits, p):
    """HF's TopPLogitsWarper: keep the fewest most likely tokens whose mass reaches ``p``
    (drop the low tail whose mass is <= 1 - p), at least one; ties at the cut are kept.

    ``p`` is one value, or ``[B, 1]`` (one per row)."""
    p = jnp.broadcast_to(jnp.reshape(p, (-1,)) if jnp.ndim(p) else p, logits.shape[:1])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    keys = _order_keys(logits)
    # The cut is the largest logit t whose tokens at or above it hold mass >= p; rounding
    # in the sum is kept from refusing every t (mass 1 at the lowest) by capping p.
    cut = _largest_threshold(keys, probs, jnp.minimum(p, jnp.sum(probs, axis=-1)))
    # p = 1 keeps every token, as HF's does (the sum's rounding would cut the last ulps of mass)
    return jnp.where((keys < cut[:, None]) & (p < 1.0)[:, None], NEG_INF, logits)


def select_tokens(logits, seen, key, params: dict, flags: SamplerFlags):
    """Next token ids ``[B]`` from float32 logits ``[B, V]``."""
    if flags.repetition_penalty:
        logits = repetition_penalty(logits, seen, params["repetition_penalty"])
    if not flags.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = params["temperature"]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if flags.top_k:
        logits = top_k_filter(logits, params["top_k"])
    if flags.top_p:
        logits = top_p_filter(logits, params["top_p"])
    sampled = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    # temperature 0 means greedy (HF would refuse it; this is the common convention)
    return jnp.where(temperature > 0, sampled, greedy)

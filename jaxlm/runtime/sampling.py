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


def top_k_filter(logits, k):
    """Keeps logits >= the k-th largest (ties kept, as HF does); ``k`` is one value or one per row."""
    k = jnp.broadcast_to(jnp.clip(k, 1, logits.shape[-1]), logits.shape[:1])
    descending = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p):
    """HF's TopPLogitsWarper: drop the low tail whose mass is <= 1 - p; keep >= 1 token.

    ``p`` is one value, or ``[B, 1]`` (one per row)."""
    order = jnp.argsort(logits, axis=-1)                     # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= (1.0 - p)
    remove_sorted = remove_sorted.at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


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

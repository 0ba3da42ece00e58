"""Chunked prefill: a long prompt goes through the model ``chunk`` tokens at a time.

Each chunk writes its keys/values into a preallocated KV cache and attends to
the cache up to itself, causally: chunk ``c`` is query slots
``[c*C, (c+1)*C)`` against key slots ``<= its own``. Chunks run under
``lax.scan`` (one compiled chunk, whatever the prompt length); attention per
chunk is the flash kernel with a traced offset on GPU/TPU, or blockwise XLA
stopping at the causal edge on CPU, so peak activation memory grows with
chunk x context, never context squared. The rotary base (dynamic NTK) is
fixed once for the whole prompt, so the result equals the unchunked call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.arrays import pad_axis
from jaxlm.nn import kv_cache
from jaxlm.nn.attention import AttentionMask


def init_caches(model, batch: int, length: int, dtype):
    """Empty per-layer caches of ``length`` slots (see `jaxlm.nn.kv_cache`)."""
    cfg = model.config
    return kv_cache.for_layers(cfg.num_hidden_layers, (batch, length, cfg.num_key_value_heads, cfg.head_dim),
                               dtype, stacked=model.options.scan_layers)


def run_chunks(model, input_ids, positions, caches, *, chunk: int, rope_len, collect, init, key_valid=None,
               segment_ids=None):
    """Runs ``input_ids [B, T]`` through ``model.model`` chunk by chunk, filling ``caches``.

    The caches' slot count S must be at least T rounded up to the chunk.
    ``collect(c, hidden_chunk, collected) -> collected`` gathers what the caller
    needs from each chunk's final hidden states (starting from ``init``): all
    logits, or one position per row. Returns ``(caches, collected)``.
    """
    B, T = input_ids.shape
    n = -(-T // chunk)
    total = n * chunk
    S = jax.tree.leaves(caches)[0].shape[-3]
    if S < total:
        raise ValueError(f"chunked prefill: cache has {S} slots, needs {total}")
    ids = pad_axis(input_ids, 1, total)
    pos = pad_axis(positions, 1, total)
    valid = key_valid if key_valid is not None else jnp.ones((B, T), bool)
    valid = pad_axis(valid.astype(bool), 1, S, False)                # never read unwritten slots
    seg_q = pad_axis(segment_ids, 1, total, -1)
    seg_k = pad_axis(segment_ids, 1, S, -2)

    def body(carry, c):
        caches, collected = carry
        start = c * chunk
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 1)
        mask = AttentionMask(S, True, start, None, valid, None if seg_q is None else take(seg_q), seg_k)
        hidden, caches = model.model(take(ids), take(pos), mask, rope_len=rope_len, kv_caches=caches,
                                     write_slot=jnp.full((B,), start, jnp.int32))
        return (caches, collect(c, hidden, collected)), None

    (caches, collected), _ = jax.lax.scan(body, (caches, init), jnp.arange(n))
    return caches, collected

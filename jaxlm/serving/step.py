"""The serving engine's compiled programs: a decode step over every slot, a prefill chunk of one request.

Everything that differs between requests is an array, so one program serves
any mix of them: sampling settings (`SlotParams`, one row per slot), rotary
lengths, positions and block tables. Shapes come from a few buckets (the
block-table width, the chunk length), all compiled at start-up; the pages
are donated, so each step updates the KV pool in place.

Sampling follows HF's order (repetition penalty, temperature, top-k, top-p,
then a draw) as `jaxlm.runtime.sampling` does for ``generate``; here every
stage takes per-row values, and stages no row needs are skipped with
``lax.cond`` (one program, no recompilation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.attention import AttentionMask
from jaxlm.nn.kv_cache import PagedLayerCache, constrain_pages
from jaxlm.runtime.sampling import repetition_penalty, top_k_filter, top_p_filter
from jaxlm.serving.params import MAX_TOP_LOGPROBS
from jaxlm.sharding import ACT, constrain, jit_with_rules

COMPILES: dict[str, int] = {"decode": 0, "prefill": 0}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotParams:
    """Per-row sampling settings (each ``[R]``)."""

    temperature: jax.Array       # float32; 0: greedy
    top_p: jax.Array             # float32 in (0, 1]
    top_k: jax.Array             # int32; 0: off
    repetition_penalty: jax.Array
    seed: jax.Array              # int32
    generated: jax.Array         # int32: tokens generated so far (keys the draw)


def sample(logits, seen, p: SlotParams):
    """Next token ``[R]`` and log-probabilities (chosen ``[R]``, top ids/values ``[R, 5]``)."""
    raw = jax.nn.log_softmax(logits, axis=-1)
    logits = jax.lax.cond(jnp.any(p.repetition_penalty != 1.0),
                          lambda x: repetition_penalty(x, seen, p.repetition_penalty[:, None]), lambda x: x, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(logits):
        scaled = logits / jnp.maximum(p.temperature, 1e-6)[:, None]
        scaled = jax.lax.cond(jnp.any(p.top_k > 0), lambda x: top_k_filter(x, jnp.where(p.top_k > 0, p.top_k,
                                                                                          x.shape[-1])),
                              lambda x: x, scaled)
        scaled = jax.lax.cond(jnp.any(p.top_p < 1.0), lambda x: top_p_filter(x, p.top_p[:, None]), lambda x: x,
                              scaled)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(p.seed, p.generated)
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(p.temperature > 0), draw, lambda x: greedy, logits)
    token = jnp.where(p.temperature > 0, sampled, greedy)
    top_values, top_ids = jax.lax.top_k(raw, MAX_TOP_LOGPROBS)
    chosen = jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0]
    return token, chosen, top_ids.astype(jnp.int32), top_values


def _layer_caches(model, pages, block_table):
    """The network's per-layer caches: a list (unrolled layers) or one stacked cache (scanned)."""
    if model.options.scan_layers:
        L = jax.tree.leaves(pages)[0].shape[0]
        return PagedLayerCache(pages, jnp.broadcast_to(block_table, (L,) + block_table.shape))
    return [PagedLayerCache(p, block_table) for p in pages]


def _pages_of(caches):
    """The updated pool, constrained to the sharding it came in with (so that the next step,
    fed this output, hits the same compiled program)."""
    if isinstance(caches, PagedLayerCache):
        return constrain_pages(caches.pages, stacked=True)
    return [constrain_pages(c.pages) for c in caches]


@functools.partial(jax.jit, donate_argnums=0)
def set_row(seen, slot, row):
    """``seen[slot] = row`` in place (a request taking a slot brings its tokens)."""
    return constrain(jax.lax.dynamic_update_index_in_dim(seen, row, slot, 0), ACT["replicated"])


@jit_with_rules(static_argnames=("graphdef",), donate_argnames=("pages", "seen"))
def decode(graphdef, state, pages, seen, tokens, positions, block_table, rope_len, params: SlotParams):
    """One new token for every slot: ``tokens [R]`` at ``positions [R]`` (idle slots: anything, block table null).

    Returns ``(pages, seen, next_token, chosen_logprob, top_ids, top_logprobs)``.
    """
    COMPILES["decode"] += 1
    model = nnx.merge(graphdef, state)
    S = block_table.shape[1] * jax.tree.leaves(pages)[0].shape[-3]
    mask = AttentionMask.decoding(S, positions + 1)
    hidden, caches = model.model(tokens[:, None], positions[:, None], mask, rope_len=rope_len,
                                 kv_caches=_layer_caches(model, pages, block_table), write_slot=positions)
    token, chosen, top_ids, top_values = sample(model.logits(hidden)[:, 0], seen, params)
    seen = constrain(seen.at[jnp.arange(token.shape[0]), token].set(True), ACT["replicated"])
    return _pages_of(caches), seen, token, chosen, top_ids, top_values


@jit_with_rules(static_argnames=("graphdef",), donate_argnames=("pages",))
def prefill(graphdef, state, pages, seen, tokens, start, valid, block_table, rope_len, params: SlotParams):
    """A chunk ``tokens [1, C]`` of one request at slots ``start + [0, C)``, ``valid`` of them real.

    Writes their keys/values into the request's pages and samples a token
    from the last real position (used when this chunk ends the prompt).
    ``seen [1, V]`` is the request's repetition-penalty row.
    """
    COMPILES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    C = tokens.shape[1]
    S = block_table.shape[1] * jax.tree.leaves(pages)[0].shape[-3]
    positions = start + jnp.arange(C, dtype=jnp.int32)[None, :]
    mask = AttentionMask(S, True, start[0])
    hidden, caches = model.model(tokens, positions, mask, rope_len=rope_len,
                                 kv_caches=_layer_caches(model, pages, block_table), write_slot=start)
    last = jax.lax.dynamic_slice_in_dim(hidden, valid - 1, 1, axis=1)               # [1, 1, E]
    token, chosen, top_ids, top_values = sample(model.logits(last)[:, 0], seen, params)
    return _pages_of(caches), token, chosen, top_ids, top_values

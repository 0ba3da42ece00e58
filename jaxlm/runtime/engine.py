"""The compiled parts of generation: prefill, and the decode loop.

Layout: prompts arrive left-padded (HF style) and are re-aligned so every
row's tokens start at cache slot 0; row ``b`` then holds ``lengths[b]`` valid
slots and its next token goes to slot ``lengths[b]`` at position
``lengths[b]``, exactly the positions HF derives from the mask. Keys past a
row's length are masked by causality, so no padding sits inside the cache.

Shapes are bucketed (prompt length, number of new tokens) and every knob
that can be a traced value is one, so a chat conversation reuses its
compiled functions. `COMPILES` counts traces per function.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.attention import AttentionMask
from jaxlm.runtime.chunked import init_caches, run_chunks
from jaxlm.runtime.sampling import SamplerFlags, select_tokens
from jaxlm.sharding import jit_with_rules

COMPILES: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = 16) -> int:
    """Powers of two up to 4096, then multiples of 4096."""
    n = max(int(n), minimum)
    if n <= 4096:
        return 1 << (n - 1).bit_length()
    return -(-n // 4096) * 4096


def _last_logits(model, hidden, lengths):
    """float32 logits ``[B, V]`` at each row's last valid token."""
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)   # [B, 1, E]
    return model.logits(last)[:, 0]


@jit_with_rules(static_argnames=("graphdef", "cache_len", "cache_dtype", "num_new", "flags", "chunk"))
def prefill(graphdef, state, ids, lengths, rope_len, seen_init, pad_id, done_init, *, cache_len,
            cache_dtype, num_new, flags, chunk=None):
    """Runs the aligned prompts ``ids [B, T]`` and returns the decode carry.

    The cache holds ``cache_len`` slots; ``num_new`` is the (bucketed) size of
    the buffer of new tokens. ``done_init`` marks rows that only pad the batch
    to the mesh (they never hold the loop open).
    """
    COMPILES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    B, T = ids.shape
    caches = init_caches(model, B, cache_len, cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if chunk:  # the prompt in chunks through the cache: memory ~ chunk x context
        last = lengths - 1

        def collect(c, hidden, out):
            at = last - c * chunk
            here = (at >= 0) & (at < chunk)
            picked = jnp.take_along_axis(hidden, jnp.clip(at, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
            return jnp.where(here[:, None], picked, out)

        caches, last_hidden = run_chunks(model, ids, positions, caches, chunk=chunk, rope_len=rope_len,
                                         collect=collect, init=jnp.zeros((B, model.config.hidden_size),
                                                                         model.options.dtype))
        logits = model.logits(last_hidden[:, None])[:, 0]
    else:
        # Queries read only the T prompt slots of the cache.
        mask = AttentionMask(T, True, 0, key_lengths=lengths)
        hidden, caches = model.model(ids, positions, mask, rope_len=rope_len, kv_caches=caches,
                                     write_slot=jnp.zeros((B,), jnp.int32))
        logits = _last_logits(model, hidden, lengths)
    return dict(caches=caches, logits=logits, lengths=lengths,
                seen=seen_init if flags.repetition_penalty else None,
                tokens=jnp.full((B, num_new), pad_id, jnp.int32), done=done_init,
                step=jnp.int32(0), token=jnp.zeros((B,), jnp.int32),
                step_logits=(jnp.zeros((B, num_new, model.config.vocab_size), jnp.float32)
                             if flags.record_logits else None))


def _decode_forward(model, carry, token, rope_len):
    lengths = carry["lengths"]
    cache_len = jax.tree.leaves(carry["caches"])[0].shape[-3]
    # The new token goes to slot `lengths` and reads slots 0..lengths.
    mask = AttentionMask.decoding(cache_len, lengths + 1)
    hidden, caches = model.model(token[:, None], lengths[:, None], mask, rope_len=rope_len,
                                 kv_caches=carry["caches"], write_slot=lengths)
    return dict(carry, caches=caches, logits=model.logits(hidden)[:, 0], lengths=lengths + 1)


def _select_and_record(carry, params, flags: SamplerFlags):
    """Picks the next token of every row from ``carry['logits']`` and records it."""
    step = carry["step"]
    key = jax.random.fold_in(params["key"], step)
    token = select_tokens(carry["logits"], carry["seen"], key, params, flags)
    token = jnp.where(carry["done"], params["pad_id"], token)
    done = carry["done"] | jnp.isin(token, params["eos_ids"])
    tokens = jax.lax.dynamic_update_slice(carry["tokens"], token[:, None], (0, step))
    seen, step_logits = carry["seen"], carry["step_logits"]
    if flags.repetition_penalty:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    if flags.record_logits:
        step_logits = jax.lax.dynamic_update_slice(step_logits, carry["logits"][:, None], (0, step, 0))
    return dict(carry, tokens=tokens, done=done, seen=seen, step=step + 1, token=token,
                step_logits=step_logits)


@jit_with_rules(static_argnames=("graphdef", "flags"), donate_argnames=("carry",))
def first_step(graphdef, state, carry, params, *, flags):
    """Selects the first new token from the prefill logits."""
    COMPILES["first_step"] += 1
    return _select_and_record(carry, params, flags)


@jit_with_rules(static_argnames=("graphdef", "flags"), donate_argnames=("carry",))
def next_step(graphdef, state, carry, params, *, flags):
    """One decode step: forward the last token, select the next (streaming path)."""
    COMPILES["next_step"] += 1
    model = nnx.merge(graphdef, state)
    carry = _decode_forward(model, carry, carry["token"], params["rope_len"])
    return _select_and_record(carry, params, flags)


@jit_with_rules(static_argnames=("graphdef", "flags"), donate_argnames=("carry",))
def decode_loop(graphdef, state, carry, params, *, flags):
    """The whole decode in one ``lax.while_loop``; exits once every row stopped."""
    COMPILES["decode_loop"] += 1
    model = nnx.merge(graphdef, state)
    carry = _select_and_record(carry, params, flags)

    def cond(c):
        return (c["step"] < params["max_new_tokens"]) & ~jnp.all(c["done"])

    def body(c):
        c = _decode_forward(model, c, c["token"], params["rope_len"])
        return _select_and_record(c, params, flags)

    return jax.lax.while_loop(cond, body, carry)

"""``generate`` / ``stream_generate`` / ``chat`` / ``stream_chat`` of the causal LM.

The model's methods of the same names call these. Validation happens here,
in Python, before anything compiles; the compiled work lives in
`jaxlm.runtime.engine`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.chat import DEFAULT_META_INSTRUCTION, build_prompt
from jaxlm.errors import JaxlmError
from jaxlm.options import check_cache_dtype
from jaxlm.plan import fmt_bytes, plan_memory
from jaxlm.runtime import engine
from jaxlm.runtime.config import GenerationDefaults
from jaxlm.runtime.forward import mesh_context
from jaxlm.runtime.sampling import SamplerFlags
from jaxlm.sharding import ACT, batch_multiple, model_mesh, named_sharding

DEFAULT = object()  # "not given" (None means "no stopping" for eos_token_id)
FIT_CHECK_TOKENS = 8192  # generations caching at least this many tokens are planned first
DEFAULT_MAX_NEW_TOKENS = 128


@dataclasses.dataclass
class _Plan:
    input_ids: np.ndarray      # as given (left-padded), [B, T]
    rows: int                  # B; arrays below may carry extra rows that pad the batch to the mesh
    aligned: np.ndarray        # each row's tokens moved to the front, [B, T_bucket]
    lengths: np.ndarray        # valid tokens per row, [B]
    max_new_tokens: int
    num_new: int               # bucketed new-token buffer
    cache_len: int
    flags: SamplerFlags
    params: dict
    seen: np.ndarray | None
    chunk: int | None = None   # prefill chunk size
    cache_dtype: object = None


def _check_ids(input_ids, attention_mask, vocab_size):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise JaxlmError(f"input_ids: expected shape [batch, length] with length >= 1, got {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise JaxlmError(f"input_ids: expected integer ids, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = np.ones(ids.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise JaxlmError(f"attention_mask: shape {mask.shape} differs from input_ids {ids.shape}")
        mask = (mask != 0).astype(np.int32)
    bad = ids[(mask == 1) & ((ids < 0) | (ids >= vocab_size))]
    if bad.size:
        raise JaxlmError(f"input_ids: id {int(bad[0])} is out of range for vocab_size {vocab_size}")
    if (mask.sum(1) == 0).any():
        raise JaxlmError("attention_mask: a row has no tokens")
    return ids, mask


def max_context(model) -> int:
    """Longest prompt + new tokens ``generate`` accepts (``ModelOptions.max_context``).

    By default 8x ``max_position_embeddings``: InternLM2's dynamic NTK rotary
    scaling extends the trained context, and the cache is sized per call.
    """
    return model.options.max_context or 8 * model.config.max_position_embeddings


def generation_defaults(model) -> GenerationDefaults:
    return getattr(model, "generation_config", None) or GenerationDefaults.from_model_config(model.config)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> int:
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise JaxlmError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise JaxlmError(f"temperature: must be >= 0, got {temperature!r}")
    if top_p is None or not 0 < top_p <= 1:
        raise JaxlmError(f"top_p: must be in (0, 1], got {top_p!r}")
    if top_k is None or isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise JaxlmError(f"top_k: must be an integer >= 0, got {top_k!r}")
    if repetition_penalty is None or repetition_penalty <= 0:
        raise JaxlmError(f"repetition_penalty: must be > 0, got {repetition_penalty!r}")
    return int(max_new_tokens)


def _stop_ids(defaults: GenerationDefaults, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id): eos from the argument or ``generation_config.json``; pad falls back to eos."""
    if eos_token_id is DEFAULT:
        eos = defaults.eos_token_id or ()
    elif eos_token_id is None:
        eos = ()
    else:
        eos = tuple(int(e) for e in np.atleast_1d(eos_token_id))
    if pad_token_id is DEFAULT or pad_token_id is None:
        pad = defaults.pad_token_id if defaults.pad_token_id is not None else (eos[0] if eos else 0)
    else:
        pad = int(pad_token_id)
    return eos, pad


def _align_prompts(ids, mask, pad: int, padded_rows: int):
    """Each row's valid tokens moved to the front of a ``[padded_rows, bucket]`` array, and their counts."""
    lengths = mask.sum(1).astype(np.int32)
    aligned = np.full((padded_rows, engine.bucket(int(lengths.max()))), pad, np.int32)
    for row in range(ids.shape[0]):  # whatever side was padded
        valid = ids[row][mask[row] == 1]
        aligned[row, : valid.size] = valid
    return aligned, np.concatenate([lengths, np.ones(padded_rows - ids.shape[0], np.int32)])


def _plan(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
          repetition_penalty, eos_token_id, pad_token_id, seed, output_logits=False,
          prefill_chunk_size=None, kv_cache_dtype=None) -> _Plan:
    """Everything one generation needs, checked: the aligned prompts, buffers and sampler settings."""
    ids, mask = _check_ids(input_ids, attention_mask, model.config.vocab_size)
    max_new_tokens = _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > max_context(model):
        raise JaxlmError(
            f"max_new_tokens: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"the maximum context of {max_context(model)} tokens (set max_context when loading the model)")
    eos, pad = _stop_ids(generation_defaults(model), eos_token_id, pad_token_id)
    rows = ids.shape[0]
    padded_rows = rows + (-rows % batch_multiple(model_mesh(model)))
    aligned, lengths = _align_prompts(ids, mask, pad, padded_rows)
    T = aligned.shape[1]
    num_new = engine.bucket(max_new_tokens)
    flags = SamplerFlags(do_sample=bool(do_sample) and temperature > 0,
                         repetition_penalty=repetition_penalty != 1.0,
                         top_k=bool(do_sample) and top_k > 0, top_p=bool(do_sample) and top_p < 1.0,
                         record_logits=bool(output_logits))
    seen = None
    if flags.repetition_penalty:  # HF penalizes every id of input_ids, padding included
        seen = np.zeros((padded_rows, model.config.vocab_size), bool)
        np.put_along_axis(seen[:rows], np.clip(ids, 0, model.config.vocab_size - 1), True, axis=1)
    params = dict(key=jax.random.key(int(seed)), temperature=jnp.float32(temperature),
                  top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                  repetition_penalty=jnp.float32(repetition_penalty),
                  eos_ids=jnp.asarray(eos if eos else (-1,), jnp.int32), pad_id=jnp.int32(pad),
                  max_new_tokens=jnp.int32(max_new_tokens),
                  rope_len=jnp.int32(longest + max_new_tokens),
                  done_init=jnp.asarray(np.arange(padded_rows) >= rows))
    chunk = None
    if prefill_chunk_size:
        if int(prefill_chunk_size) < 1:
            raise JaxlmError(f"prefill_chunk_size: must be >= 1, got {prefill_chunk_size!r}")
        chunk = min(int(prefill_chunk_size), T)
    prompt_slots = -(-T // chunk) * chunk if chunk else T
    cache_dtype = check_cache_dtype(kv_cache_dtype) or model.options.kv_cache_dtype or model.options.dtype
    return _Plan(ids, rows, aligned, lengths, max_new_tokens, num_new, prompt_slots + num_new, flags,
                 params, seen, chunk, jnp.dtype(cache_dtype))


def _check_fits(model, plan: _Plan) -> None:
    """Before a long generation: refuse one the planner says will not fit, and say what would."""
    if plan.cache_len < FIT_CHECK_TOKENS:
        return
    try:
        limit = jax.devices()[0].memory_stats()["bytes_limit"]
    except Exception:  # CPU and some backends report no limit: nothing to check against
        return
    opts = model.options
    estimate = plan_memory(model.config, mesh=model_mesh(model), batch=plan.aligned.shape[0],
                           context=plan.cache_len, dtype=opts.dtype, param_dtype=opts.param_dtype,
                           kv_cache_dtype=plan.cache_dtype, chunk=plan.chunk or plan.aligned.shape[1],
                           scan_layers=opts.scan_layers, device=int(limit), headroom=0.95,
                           context_attention=opts.context_attention)
    if estimate.fits is False:
        tips = "; ".join(n for n in estimate.notes if n.startswith("try")) or "use a larger mesh"
        raise JaxlmError(
            f"max_new_tokens: this generation ({plan.cache_len} cached tokens x {plan.aligned.shape[0]} rows) "
            f"needs about {fmt_bytes(estimate.total)} per device (KV cache {fmt_bytes(estimate.kv_cache)}, "
            f"activations {fmt_bytes(estimate.activations)}) but a device has {fmt_bytes(limit)}: {tips}")


def _prefill(model, plan: _Plan):
    _check_fits(model, plan)
    graphdef, state = nnx.split(model)
    mesh = model_mesh(model)
    inputs = (plan.aligned, plan.lengths, plan.seen)
    if mesh is not None:  # rows split over data x fsdp
        rows = named_sharding(mesh, ACT["rows"])
        inputs = tuple(None if x is None else jax.device_put(x, rows) for x in inputs)
    with mesh_context(mesh):
        carry = engine.prefill(graphdef, state, inputs[0], inputs[1], plan.params["rope_len"],
                               inputs[2], plan.params["pad_id"], plan.params["done_init"],
                               cache_len=plan.cache_len, cache_dtype=plan.cache_dtype,
                               num_new=plan.num_new, flags=plan.flags, chunk=plan.chunk)
    return graphdef, state, carry


def generate(model, input_ids, attention_mask=None, max_new_tokens=None, do_sample=False,
             temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=DEFAULT,
             pad_token_id=DEFAULT, seed=0, streamer=None, output_logits=False,
             return_dict_in_generate=False, prefill_chunk_size=None, kv_cache_dtype=None):
    """HF-style generation: ``[batch, prompt + new]`` ids; stopped rows padded with pad_token_id.

    ``eos_token_id`` may be an int or a list; ``None`` disables stopping; by
    default it comes from ``generation_config.json``. Left-padded batches
    take their positions from ``attention_mask``. With ``streamer``
    (HF's ``put``/``end`` protocol) tokens are pushed as they come. With
    ``return_dict_in_generate=True, output_logits=True`` it returns
    ``{"sequences", "logits"}``, the raw float32 logits of every step ``[B, new, V]``.
    ``prefill_chunk_size`` runs the prompt through the cache that many
    tokens at a time; ``kv_cache_dtype`` overrides the model's cache dtype.
    """
    plan = _plan(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                 top_p, repetition_penalty, eos_token_id, pad_token_id, seed,
                 output_logits and return_dict_in_generate, prefill_chunk_size, kv_cache_dtype)
    if streamer is not None:
        streamer.put(plan.input_ids)
        new = [tok for tok in _stream(model, plan, streamer)]
        streamer.end()
        new = np.stack(new, axis=1) if new else np.zeros((plan.input_ids.shape[0], 0), np.int32)
        return np.concatenate([plan.input_ids, new.astype(plan.input_ids.dtype)], axis=1)
    graphdef, state, carry = _prefill(model, plan)
    with mesh_context(model_mesh(model)):
        carry = engine.decode_loop(graphdef, state, carry, plan.params, flags=plan.flags)
    steps = int(carry["step"])
    new = np.asarray(carry["tokens"][: plan.rows, :steps]).astype(plan.input_ids.dtype)
    sequences = np.concatenate([plan.input_ids, new], axis=1)
    if not return_dict_in_generate:
        return sequences
    out = {"sequences": sequences}
    if plan.flags.record_logits:
        out["logits"] = np.asarray(carry["step_logits"][: plan.rows, :steps])
    return out


def stream_generate(model, input_ids, attention_mask=None, max_new_tokens=None, do_sample=False,
                    temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                    eos_token_id=DEFAULT, pad_token_id=DEFAULT, seed=0,
                    prefill_chunk_size=None, kv_cache_dtype=None) -> Iterator[np.ndarray]:
    """Yields the new token of every row (``[batch]`` ids) as soon as it is chosen."""
    plan = _plan(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                 top_p, repetition_penalty, eos_token_id, pad_token_id, seed,
                 prefill_chunk_size=prefill_chunk_size, kv_cache_dtype=kv_cache_dtype)
    yield from _stream(model, plan)


def _stream(model, plan: _Plan, streamer=None):
    graphdef, state, carry = _prefill(model, plan)
    mesh = model_mesh(model)
    with mesh_context(mesh):
        carry = engine.first_step(graphdef, state, carry, plan.params, flags=plan.flags)
    for step in range(plan.max_new_tokens):
        if step:
            with mesh_context(mesh):
                carry = engine.next_step(graphdef, state, carry, plan.params, flags=plan.flags)
        token, done = jax.device_get((carry["token"][: plan.rows], carry["done"]))
        if streamer is not None:
            streamer.put(np.asarray(token))
        yield np.asarray(token)
        if done.all():
            return


# ------------------------------------------------------------------------ chat
def chat_inputs(tokenizer, query, history, meta_instruction):
    if not isinstance(query, str) or not query.strip():
        raise JaxlmError(f"query: must be a non-empty string, got {query!r}")
    prompt = build_prompt(query, history or [], meta_instruction)
    if not tokenizer.add_bos_token:  # as the original build_inputs
        prompt = tokenizer.special_ids.get(tokenizer.bos_token_id, "<s>") + prompt
    ids = tokenizer.encode(prompt)
    eos = [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
    return np.asarray([ids], np.int32), eos


def chat(model, tokenizer, query: str, history: Sequence = (), streamer=None, max_new_tokens=1024,
         do_sample=True, temperature=0.8, top_p=0.8, meta_instruction=DEFAULT_META_INSTRUCTION, **kwargs):
    """InternLM2's ``model.chat``: returns ``(response, history + [(query, response)])``."""
    ids, eos = chat_inputs(tokenizer, query, history, meta_instruction)
    kwargs.setdefault("eos_token_id", eos)
    out = generate(model, ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                   top_p=top_p, streamer=streamer, **kwargs)
    response = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("<|im_end|>")[0]
    return response, list(history or []) + [(query, response)]


def stream_chat(model, tokenizer, query: str, history: Sequence = (), max_new_tokens=1024, do_sample=True,
                temperature=0.8, top_p=0.8, meta_instruction=DEFAULT_META_INSTRUCTION, **kwargs):
    """Yields ``(response_so_far, history + [(query, response_so_far)])`` as tokens arrive."""
    ids, eos = chat_inputs(tokenizer, query, history, meta_instruction)
    kwargs.setdefault("eos_token_id", eos)
    new, shown = [], None
    for token in stream_generate(model, ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, **kwargs):
        new.append(int(token[0]))
        text = tokenizer.decode(new, skip_special_tokens=True).split("<|im_end|>")[0]
        if text != shown and not text.endswith("\ufffd"):  # wait for whole characters
            shown = text
            yield text, list(history or []) + [(query, text)]
    final = tokenizer.decode(new, skip_special_tokens=True).split("<|im_end|>")[0]
    if final != shown:
        yield final, list(history or []) + [(query, final)]

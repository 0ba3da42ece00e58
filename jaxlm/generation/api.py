"""``generate`` / ``stream_generate`` / ``chat`` / ``stream_chat`` on the causal LM.

Validation happens here, in Python, before anything compiles; the compiled
work lives in `jaxlm.generation.engine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.chat import DEFAULT_META_INSTRUCTION, build_prompt
from jaxlm.errors import JaxlmError
from jaxlm.generation import engine
from jaxlm.generation.sampling import SamplerFlags
from jaxlm.sharding import batch_multiple, model_mesh, named_sharding

_DEFAULT = object()  # "not given" (None means "no stopping" for eos_token_id)
FIT_CHECK_TOKENS = 8192  # generations caching at least this many tokens are planned first


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


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


class GenerationMixin:
    """Adds HF-style generation and InternLM2's chat API to the causal LM."""

    @property
    def max_context(self) -> int:
        """Longest prompt + new tokens ``generate`` accepts (``ModelOptions.max_context``)."""
        if self.options.max_context:
            return self.options.max_context
        return 8 * self.config.max_position_embeddings

    def _generation_defaults(self):
        from jaxlm.generation.config import GenerationDefaults

        return getattr(self, "generation_config", None) or GenerationDefaults.from_model_config(self.config)

    def _plan(self, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
              repetition_penalty, eos_token_id, pad_token_id, seed, output_logits=False,
              prefill_chunk_size=None, kv_cache_dtype=None) -> _Plan:
        defaults = self._generation_defaults()
        ids, mask = _check_ids(input_ids, attention_mask, self.config.vocab_size)
        if max_new_tokens is None:
            max_new_tokens = 128
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
        lengths = mask.sum(1).astype(np.int32)
        longest = int(lengths.max())
        if longest + max_new_tokens > self.max_context:
            raise JaxlmError(
                f"max_new_tokens: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the maximum context of {self.max_context} tokens (set max_context when loading the model)")
        if eos_token_id is _DEFAULT:
            eos = defaults.eos_token_id or ()
        elif eos_token_id is None:
            eos = ()
        else:
            eos = tuple(int(e) for e in np.atleast_1d(eos_token_id))
        if pad_token_id is _DEFAULT or pad_token_id is None:
            pad = defaults.pad_token_id if defaults.pad_token_id is not None else (eos[0] if eos else 0)
        else:
            pad = int(pad_token_id)
        T = engine.bucket(longest)
        rows = ids.shape[0]
        padded_rows = rows + (-rows % batch_multiple(model_mesh(self)))
        aligned = np.full((padded_rows, T), pad, np.int32)
        for row in range(rows):  # valid tokens to the front, whatever side was padded
            valid = ids[row][mask[row] == 1]
            aligned[row, : valid.size] = valid
        lengths = np.concatenate([lengths, np.ones(padded_rows - rows, np.int32)])
        num_new = engine.bucket(max_new_tokens)
        flags = SamplerFlags(do_sample=bool(do_sample) and temperature > 0,
                             repetition_penalty=repetition_penalty != 1.0,
                             top_k=bool(do_sample) and top_k > 0, top_p=bool(do_sample) and top_p < 1.0,
                             record_logits=bool(output_logits))
        seen = None
        if flags.repetition_penalty:  # HF penalizes every id of input_ids, padding included
            seen = np.zeros((padded_rows, self.config.vocab_size), bool)
            np.put_along_axis(seen[:rows], np.clip(ids, 0, self.config.vocab_size - 1), True, axis=1)
        params = dict(key=jax.random.key(int(seed)), temperature=jnp.float32(temperature),
                      top_k=jnp.int32(top_k), top_p=jnp.float32(top_p),
                      repetition_penalty=jnp.float32(repetition_penalty),
                      eos_ids=jnp.asarray(eos if eos else (-1,), jnp.int32), pad_id=jnp.int32(pad),
                      max_new_tokens=jnp.int32(max_new_tokens),
                      rope_len=jnp.int32(longest + max_new_tokens))
        params["done_init"] = jnp.asarray(np.arange(padded_rows) >= rows)
        chunk = None
        if prefill_chunk_size:
            if int(prefill_chunk_size) < 1:
                raise JaxlmError(f"prefill_chunk_size: must be >= 1, got {prefill_chunk_size!r}")
            chunk = min(int(prefill_chunk_size), T)
        prompt_slots = -(-T // chunk) * chunk if chunk else T
        from jaxlm.models.options import check_cache_dtype

        cache_dtype = check_cache_dtype(kv_cache_dtype) or self.options.kv_cache_dtype or self.options.dtype
        return _Plan(ids, rows, aligned, lengths, int(max_new_tokens), num_new, prompt_slots + num_new, flags,
                     params, seen, chunk, jnp.dtype(cache_dtype))

    def _check_fits(self, plan: _Plan) -> None:
        """Before a long generation: refuse one the planner says will not fit, and say what would."""
        if plan.cache_len < FIT_CHECK_TOKENS:
            return
        try:
            limit = jax.devices()[0].memory_stats()["bytes_limit"]
        except Exception:  # CPU and some backends report no limit: nothing to check against
            return
        from jaxlm.plan import fmt_bytes, plan_memory

        mesh = model_mesh(self)
        estimate = plan_memory(self.config, mesh=mesh, batch=plan.aligned.shape[0], context=plan.cache_len,
                               dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                               kv_cache_dtype=plan.cache_dtype, chunk=plan.chunk or plan.aligned.shape[1],
                               scan_layers=self.options.scan_layers, device=int(limit), headroom=0.95,
                               context_attention=self.options.context_attention)
        if estimate.fits is False:
            tips = "; ".join(n for n in estimate.notes if n.startswith("try")) or "use a larger mesh"
            raise JaxlmError(
                f"max_new_tokens: this generation ({plan.cache_len} cached tokens x {plan.aligned.shape[0]} rows) "
                f"needs about {fmt_bytes(estimate.total)} per device (KV cache {fmt_bytes(estimate.kv_cache)}, "
                f"activations {fmt_bytes(estimate.activations)}) but a device has {fmt_bytes(limit)}: {tips}")

    def _prefill(self, plan: _Plan):
        self._check_fits(plan)
        graphdef, state = nnx.split(self)
        mesh = model_mesh(self)
        inputs = (plan.aligned, plan.lengths, plan.seen)
        if mesh is not None:  # rows split over data x fsdp
            rows = named_sharding(mesh, ("batch",))
            inputs = tuple(None if x is None else jax.device_put(x, rows) for x in inputs)
        with _mesh_context(mesh):
            carry = engine.prefill(graphdef, state, inputs[0], inputs[1], plan.params["rope_len"],
                                   inputs[2], plan.params["pad_id"], plan.params["done_init"],
                                   cache_len=plan.cache_len, cache_dtype=plan.cache_dtype,
                                   num_new=plan.num_new, flags=plan.flags, chunk=plan.chunk)
        return graphdef, state, carry

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, do_sample=False,
                 temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=_DEFAULT,
                 pad_token_id=_DEFAULT, seed=0, streamer=None, output_logits=False,
                 return_dict_in_generate=False, prefill_chunk_size=None, kv_cache_dtype=None):
        """HF-style generation: ``[batch, prompt + new]`` ids; stopped rows padded with pad_token_id.

        ``eos_token_id`` may be an int or a list; ``None`` disables stopping; by
        default it comes from ``generation_config.json``. Left-padded batches
        take their positions from ``attention_mask``. With ``streamer``
        (HF's ``put``/``end`` protocol) tokens are pushed as they come. With
        ``return_dict_in_generate=True, output_logits=True`` it returns
        ``{"sequences", "logits"}``, the raw float32 logits of every step ``[B, new, V]``.
        """
        plan = self._plan(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                          top_p, repetition_penalty, eos_token_id, pad_token_id, seed,
                          output_logits and return_dict_in_generate, prefill_chunk_size, kv_cache_dtype)
        if streamer is not None:
            streamer.put(plan.input_ids)
            new = [tok for tok in self._stream(plan, streamer)]
            streamer.end()
            new = np.stack(new, axis=1) if new else np.zeros((plan.input_ids.shape[0], 0), np.int32)
            return np.concatenate([plan.input_ids, new.astype(plan.input_ids.dtype)], axis=1)
        graphdef, state, carry = self._prefill(plan)
        with _mesh_context(model_mesh(self)):
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

    def stream_generate(self, input_ids, attention_mask=None, max_new_tokens=None, do_sample=False,
                        temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                        eos_token_id=_DEFAULT, pad_token_id=_DEFAULT, seed=0,
                        prefill_chunk_size=None, kv_cache_dtype=None) -> Iterator[np.ndarray]:
        """Yields the new token of every row (``[batch]`` ids) as soon as it is chosen."""
        plan = self._plan(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                          top_p, repetition_penalty, eos_token_id, pad_token_id, seed,
                          prefill_chunk_size=prefill_chunk_size, kv_cache_dtype=kv_cache_dtype)
        yield from self._stream(plan)

    def _stream(self, plan: _Plan, streamer=None):
        graphdef, state, carry = self._prefill(plan)
        mesh = model_mesh(self)
        with _mesh_context(mesh):
            carry = engine.first_step(graphdef, state, carry, plan.params, flags=plan.flags)
        for step in range(plan.max_new_tokens):
            if step:
                with _mesh_context(mesh):
                    carry = engine.next_step(graphdef, state, carry, plan.params, flags=plan.flags)
            token, done = jax.device_get((carry["token"][: plan.rows], carry["done"]))
            if streamer is not None:
                streamer.put(np.asarray(token))
            yield np.asarray(token)
            if done.all():
                return

    # -------------------------------------------------------------------- chat
    def _chat_inputs(self, tokenizer, query, history, meta_instruction):
        if not isinstance(query, str) or not query.strip():
            raise JaxlmError(f"query: must be a non-empty string, got {query!r}")
        prompt = build_prompt(query, history or [], meta_instruction)
        if not tokenizer.add_bos_token:  # as the original build_inputs
            prompt = tokenizer.special_ids.get(tokenizer.bos_token_id, "<s>") + prompt
        ids = tokenizer.encode(prompt)
        eos = [tokenizer.eos_token_id, tokenizer.token_to_id("<|im_end|>")]
        return np.asarray([ids], np.int32), eos

    def chat(self, tokenizer, query: str, history: Sequence = (), streamer=None, max_new_tokens=1024,
             do_sample=True, temperature=0.8, top_p=0.8, meta_instruction=DEFAULT_META_INSTRUCTION,
             **kwargs):
        """InternLM2's ``model.chat``: returns ``(response, history + [(query, response)])``."""
        ids, eos = self._chat_inputs(tokenizer, query, history, meta_instruction)
        kwargs.setdefault("eos_token_id", eos)
        out = self.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_p=top_p, streamer=streamer, **kwargs)
        response = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("<|im_end|>")[0]
        return response, list(history or []) + [(query, response)]

    def stream_chat(self, tokenizer, query: str, history: Sequence = (), max_new_tokens=1024,
                    do_sample=True, temperature=0.8, top_p=0.8,
                    meta_instruction=DEFAULT_META_INSTRUCTION, **kwargs):
        """Yields ``(response_so_far, history + [(query, response_so_far)])`` as tokens arrive."""
        ids, eos = self._chat_inputs(tokenizer, query, history, meta_instruction)
        kwargs.setdefault("eos_token_id", eos)
        new, shown = [], None
        for token in self.stream_generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=temperature, top_p=top_p, **kwargs):
            new.append(int(token[0]))
            text = tokenizer.decode(new, skip_special_tokens=True).split("<|im_end|>")[0]
            if text != shown and not text.endswith("\ufffd"):  # wait for whole characters
                shown = text
                yield text, list(history or []) + [(query, text)]
        final = tokenizer.decode(new, skip_special_tokens=True).split("<|im_end|>")[0]
        if final != shown:
            yield final, list(history or []) + [(query, final)]

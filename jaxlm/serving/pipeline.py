"""`jaxlm.pipeline`: LMDeploy-style offline batch inference on the serving engine.

>>> pipe = jaxlm.pipeline("path/to/internlm2-chat-7b", max_num_seqs=16)
>>> pipe(["Hi, please introduce yourself", "Shanghai is"], max_tokens=64)
[Response(text=..., token_ids=[...], finish_reason='stop', ...), ...]

Every prompt of a call goes into the engine at once, so they are decoded
with continuous batching over the paged KV cache (and share prefix pages).
Runs synchronously in the caller's thread; no server, no event loop.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from tqdm.auto import tqdm

from jaxlm.chat import DEFAULT_META_INSTRUCTION
from jaxlm.checkpoint.source import resolve_source
from jaxlm.errors import JaxlmError
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.serving.engine import Engine, EngineConfig
from jaxlm.serving.params import SamplingParams, TokenLogprob
from jaxlm.tokenizer import InternLM2Tokenizer

PROGRESS_FROM = 16   # prompts in a call from which the progress bar shows (progress=None)
_ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
# as model.chat: sampling at temperature 0.8, top_p 0.8
_DEFAULTS = dict(max_tokens=512, temperature=0.8, top_p=0.8)


@dataclasses.dataclass
class Response:
    """One prompt's result (LMDeploy's ``Response``: ``text``, ``token_ids``, ``finish_reason`` ...)."""

    text: str
    token_ids: list[int]
    finish_reason: str             # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    index: int
    logprobs: list[TokenLogprob] | None = None


class Pipeline:
    """Batch inference over one `Engine`: ``pipe(prompts, **sampling) -> list[Response]``."""

    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), warmup: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, config)
        if warmup:
            self.engine.warmup()
        im_end = tokenizer.special_tokens.get("<|im_end|>")
        self.chat_stop_ids = sorted(set(self.engine.default_stop) | {tokenizer.eos_token_id}
                                    | ({im_end} if im_end is not None else set()))

    def __call__(self, prompts, *, chat: bool = True, system: str | None = DEFAULT_META_INSTRUCTION,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, progress: bool | None = None,
                 **sampling):
        """Generates for one prompt (returns a `Response`) or a list (returns a list, in order).

        A prompt is a string, a list of OpenAI-style chat messages, or token
        ids. ``chat=True`` (default) renders a string as ``model.chat`` does
        (``system`` is its system prompt, InternLM2's default unless "" or None)
        and stops at ``<|im_end|>``; messages are rendered as given;
        ``chat=False`` completes the raw text (encoded with BOS). Generation
        options are `SamplingParams` fields (``max_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``stop``,
        ``ignore_eos``, ``logprobs`` ...), by keyword or as ``params`` (one, or
        one per prompt); ``max_tokens`` is capped at what ``max_model_len``
        leaves after the prompt.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                               and (isinstance(prompts[0], dict) or isinstance(prompts[0], int)))
        items = [prompts] if single else list(prompts)
        if not items:
            return []
        encoded = [self._encode(p, chat, system, i) for i, p in enumerate(items)]
        per_prompt = self._params(params, sampling, encoded)
        show = len(items) >= PROGRESS_FROM if progress is None else progress
        results = self._run(encoded, per_prompt, chat, show)
        return results[0] if single else results

    # -------------------------------------------------------------- inputs
    def _encode(self, prompt, chat: bool, system, i: int) -> tuple[list[int], bool]:
        """(prompt ids, whether it is a chat prompt)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not chat:
                return tok.encode(prompt), False
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            return tok.apply_chat_template(messages, tokenize=True), True
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            try:
                return tok.apply_chat_template(list(prompt), tokenize=True), True
            except JaxlmError as e:
                raise JaxlmError(f"prompts[{i}]: {e}") from None
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt], False
        raise JaxlmError(f"prompts[{i}]: expected a string, a list of chat messages or token ids, got {prompt!r:.80}")

    def _params(self, params, sampling, encoded) -> list[SamplingParams]:
        unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
        if unknown:
            raise JaxlmError(f"pipeline: unknown generation option(s) {unknown}; expected {_SAMPLING_FIELDS}")
        if params is not None and sampling:
            raise JaxlmError("pipeline: give either params= or generation keywords, not both")
        limit = self.engine.max_model_len
        out = []
        for i, (ids, _) in enumerate(encoded):
            if len(ids) >= limit:
                raise JaxlmError(f"prompts[{i}]: {len(ids)} tokens leave no room for output within "
                                 f"max_model_len ({limit})")
            if params is None:
                kwargs = {**_DEFAULTS, **sampling}
                if "max_tokens" not in sampling:
                    kwargs["max_tokens"] = min(kwargs["max_tokens"], limit - len(ids))
                out.append(SamplingParams(**kwargs))
            elif isinstance(params, SamplingParams):
                out.append(params)
            else:
                if len(params) != len(encoded):
                    raise JaxlmError(f"params: {len(params)} given for {len(encoded)} prompts")
                out.append(params[i])
        return out

    # ----------------------------------------------------------------- run
    def _run(self, encoded, params, chat, show) -> list[Response]:
        eng = self.engine
        ids = [eng.add_request(prompt, p, stop_token_ids=self.chat_stop_ids if is_chat else None)
               for (prompt, is_chat), p in zip(encoded, params)]
        index = {rid: i for i, rid in enumerate(ids)}
        parts = [dict(text=[], token_ids=[], logprobs=[], finish=None, prompt=0, completion=0) for _ in ids]
        done = 0
        bar = tqdm(total=len(ids), desc="generating", unit="prompt", disable=not show)
        try:
            while done < len(ids):
                for out in eng.step():
                    p = parts[index[out.request_id]]
                    p["text"].append(out.text)
                    p["token_ids"] += out.token_ids
                    p["logprobs"] += out.logprobs or []
                    p["prompt"], p["completion"] = out.prompt_tokens, out.completion_tokens
                    if out.finished:
                        p["finish"] = out.finish_reason
                        done += 1
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:   # an interrupted call leaves nothing running (no-op for finished ones)
                eng.abort(rid)
        return [Response("".join(p["text"]), p["token_ids"], p["finish"], p["prompt"], p["completion"], i,
                         p["logprobs"] if params[i].logprobs is not None else None)
                for i, p in enumerate(parts)]


def pipeline(model_dir_or_model, tokenizer=None, *, dtype: str | None = None, scan_layers: bool = False,
             warmup: bool = False, **engine_options) -> Pipeline:
    """A `Pipeline` over a checkpoint directory (loaded here) or a loaded model.

    ``engine_options`` are `EngineConfig` fields (``max_num_seqs``,
    ``max_model_len``, ``page_size``, ``num_pages``, ``kv_cache_memory``,
    ``max_num_batched_tokens``, ``kv_cache_dtype``). ``tokenizer`` defaults to
    the directory's; a loaded model needs one. ``warmup=True`` compiles every
    program first (as the server does); otherwise each compiles on first use.
    """
    unknown = sorted(set(engine_options) - set(_ENGINE_FIELDS))
    if unknown:
        raise JaxlmError(f"pipeline: unknown engine option(s) {unknown}; expected {_ENGINE_FIELDS}")
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        source = resolve_source(os.fspath(model_dir_or_model))    # a directory (HF, Origin, jaxlm) or hub id
        path, config = source.path, source.config()
        wanted = engine_options.get("max_model_len")
        too_long = wanted is not None and wanted > 8 * config.max_position_embeddings
        model = InternLM2ForCausalLM.from_pretrained(path, dtype=dtype, scan_layers=scan_layers,
                                                     max_context=wanted if too_long else None)
        tokenizer = tokenizer or InternLM2Tokenizer.from_pretrained(path)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise JaxlmError("pipeline: a loaded model needs tokenizer= (an InternLM2Tokenizer)")
        if dtype is not None:
            raise JaxlmError("pipeline: dtype= applies when loading from a directory")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = InternLM2Tokenizer.from_pretrained(os.fspath(tokenizer))
    return Pipeline(model, tokenizer, EngineConfig(**engine_options), warmup=warmup)

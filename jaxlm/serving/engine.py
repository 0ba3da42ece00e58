"""The serving engine: continuous batching over a paged KV cache, with prefix caching.

One loop owns the compiled programs (`jaxlm.serving.step`) and every
request's state. Each `step`:

1. gives every decoding request a slot for its next token, preempting the
   newest running request when the page pool runs dry (it is recomputed
   later, never dropped);
2. runs one decode step for all of them at once;
3. spends what is left of the token budget (``max_num_batched_tokens``) on
   prefill chunks, first of requests already prefilling, then of waiting
   ones admitted first come, first served, so a long prompt never stalls
   the others;
4. turns new tokens into text, applies the stops, and reports what changed.

The HTTP layer sees only `add_request`, `step`, `abort` and the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
import time
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

from jaxlm.errors import JaxlmError
from jaxlm.nn import kv_cache
from jaxlm.options import check_cache_dtype
from jaxlm.runtime.generate import generation_defaults
from jaxlm.serving import step as programs
from jaxlm.serving.pages import NULL_PAGE, PagePool, page_keys
from jaxlm.serving.params import RequestError, RequestOutput, SamplingParams, TokenLogprob
from jaxlm.serving.step import SlotParams
from jaxlm.runtime.forward import mesh_context
from jaxlm.sharding import ACT, constrain, mesh_sizes, model_mesh

_compiles = [0]
# Every XLA compilation in the process, whatever triggered it: after `Engine.warmup` a
# serving process should see none (a test and the /metrics endpoint read this).
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _secs, **_: _compiles.__setitem__(0, _compiles[0] + (event == BACKEND_COMPILE_EVENT)))


def compile_count() -> int:
    return _compiles[0]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 8                  # requests decoding at once (slots)
    max_model_len: int | None = None       # prompt + max_tokens; default: the model's max_context
    page_size: int = 16
    num_pages: int | None = None           # default: what kv_cache_memory holds
    kv_cache_memory: float = 1.0           # GiB per device for the KV pages when num_pages is not given
    max_num_batched_tokens: int = 256      # decode tokens + prefill tokens per step
    kv_cache_dtype: str | None = None      # default: the model's cache dtype
    enable_prefix_caching: bool = True     # reuse the pages of a prefix another request computed

    def __post_init__(self):
        for name in ("max_num_seqs", "page_size", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise JaxlmError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs + 1:
            raise JaxlmError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed "
                             f"max_num_seqs ({self.max_num_seqs}): every step decodes each running request")


@dataclasses.dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    rope_len: int
    seed: int
    arrival: float
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[bytes] = dataclasses.field(default_factory=list)   # cache keys of its full pages
    computed: int = 0            # tokens whose keys/values are in its pages
    slot: int | None = None
    emitted: int = 0             # characters of text already reported
    emitted_tokens: int = 0
    first_token_time: float | None = None
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def to_prefill(self) -> int:
        """Tokens whose keys/values must still be computed before it can decode (its last
        generated token, if any, is the next decode step's input)."""
        return len(self.tokens) - (1 if self.generated else 0) - self.computed

    @property
    def prefilling(self) -> bool:
        return self.to_prefill > 0


def _serving_mesh(model):
    """The model's mesh, when the engine can serve on it: data, fsdp and tensor axes (the
    pool's kv heads split over tensor), not context, which splits one long sequence's
    cache and is the single-request path (`model.generate`)."""
    mesh = model_mesh(model)
    if mesh is not None and mesh_sizes(mesh).get("context", 1) > 1:
        raise JaxlmError(f"mesh: the serving engine does not split the cache over the context axis "
                         f"({dict(mesh.shape)}); use data, fsdp and tensor axes, or model.generate for "
                         f"one long sequence")
    return mesh


def _local_kv_heads(cfg, mesh) -> int:
    """The kv heads of the pool one device holds (``kv_cache_memory`` is per device)."""
    tensor = mesh_sizes(mesh).get("tensor", 1) if mesh is not None else 1
    return cfg.num_key_value_heads // tensor if cfg.num_key_value_heads % tensor == 0 else cfg.num_key_value_heads


def _buckets(limit: int, start: int = 1, factor: int = 2) -> list[int]:
    out, n = [], start
    while n < limit:
        out.append(n)
        n *= factor
    return out + [limit]


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        cfg = model.config
        self.mesh = _serving_mesh(model)
        self.max_model_len = config.max_model_len or model.max_context
        self.page_size = config.page_size
        self.pages_per_row = -(-self.max_model_len // self.page_size)
        self.cache_dtype = (check_cache_dtype(config.kv_cache_dtype) or model.options.kv_cache_dtype
                            or model.options.dtype)
        per_page = kv_cache.bytes_per_token(cfg.num_hidden_layers, _local_kv_heads(cfg, self.mesh), cfg.head_dim,
                                            self.cache_dtype) * self.page_size
        num_pages = config.num_pages or max(2, int(config.kv_cache_memory * 2**30 // per_page))
        self.pool = PagePool(num_pages, self.page_size)
        self.graphdef, self.state = nnx.split(model)
        R, V = config.max_num_seqs, cfg.vocab_size
        layers = cfg.num_hidden_layers
        pool = functools.partial(kv_cache.empty_pages, num_pages, self.page_size, cfg.num_key_value_heads,
                                 cfg.head_dim, self.cache_dtype)
        # Built by a compiled call under the model's mesh, so the pool is born with its
        # sharding (kv heads over the tensor axis); then committed to it, as every step
        # returns it committed (an argument-less jit's outputs are not): jit keys committed
        # and uncommitted arguments apart, so otherwise each program would compile twice.
        with mesh_context(self.mesh):
            if model.options.scan_layers:
                kv = jax.jit(lambda: pool(layers=layers))()
            else:
                kv = [jax.jit(pool)() for _ in range(layers)]
            seen = jax.jit(lambda: constrain(jnp.zeros((R, V), bool), ACT["replicated"]))()
        self.kv, self.seen = jax.tree.map(lambda x: jax.device_put(x, x.sharding), (kv, seen))
        self.slots: list[_Request | None] = [None] * R
        self.waiting: deque[_Request] = deque()
        self.requests: dict[str, _Request] = {}
        self.default_stop = frozenset(generation_defaults(model).eos_token_id or ())
        self.width_buckets = _buckets(self.pages_per_row)
        self.chunk_buckets = _buckets(min(config.max_num_batched_tokens, self.pages_per_row * self.page_size), 16, 4)
        rope = model.model.rope
        self._dynamic = rope.scaling_type == "dynamic"
        self._max_pos = rope.max_position_embeddings
        self._ids = itertools.count()
        self.preemptions = 0
        self._rng = random.Random(0)

    def warmup(self) -> int:
        """Compiles every program a request mix can need (each block-table width; each chunk
        length with each width that holds it), so that serving never compiles. Returns the
        number of programs run."""
        with mesh_context(self.mesh):
            return self._warmup()

    def _warmup(self) -> int:
        R = self.config.max_num_seqs
        idle = [None] * R
        zeros = np.zeros(R, np.int32)
        count = 0
        for width in self.width_buckets:
            self.kv, self.seen, *_ = programs.decode(
                self.graphdef, self.state, self.kv, self.seen, zeros, zeros, self._block_table(idle, width),
                np.ones(R, np.int32), self._params(idle))
            count += 1
            for C in self.chunk_buckets:
                if C <= width * self.page_size:
                    self.kv, *_ = programs.prefill(
                        self.graphdef, self.state, self.kv, np.zeros((1, self.model.config.vocab_size), bool),
                        np.zeros((1, C), np.int32), np.zeros(1, np.int32), np.int32(1),
                        self._block_table([None], width), np.ones(1, np.int32), self._params([None]))
                    count += 1
        self.seen = programs.set_row(self.seen, np.int32(0), np.zeros(self.model.config.vocab_size, bool))
        jax.block_until_ready(self.kv)
        return count

    # ----------------------------------------------------------- requests
    def add_request(self, prompt_ids, params: SamplingParams, request_id: str | None = None,
                    stop_token_ids=None) -> str:
        """Queues a request; ``stop_token_ids`` replaces the model's eos ids (e.g. chat's ``<|im_end|>``)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("prompt", "must hold at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is out of range for vocab_size {vocab}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise RequestError("max_tokens", f"the prompt ({len(prompt)} tokens) plus max_tokens "
                                             f"({params.max_tokens}) exceeds max_model_len ({self.max_model_len})")
        stops = self.default_stop if stop_token_ids is None else frozenset(int(t) for t in stop_token_ids)
        if params.ignore_eos:
            stops = frozenset()
        stops |= frozenset(params.stop_token_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError("request_id", f"{request_id!r} is already running")
        seed = params.seed if params.seed is not None else self._rng.randrange(2**31)
        req = _Request(request_id, prompt, params, stops, len(prompt) + params.max_tokens, seed, time.monotonic())
        self.requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Ends a request now and frees its pages (a client that went away)."""
        req = self.requests.get(request_id)
        if req is not None:
            self._finish(req, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        self.pool.release(req.pages)
        req.pages = []
        if req.slot is not None:
            self.slots[req.slot] = None
            req.slot = None
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.id, None)

    # ----------------------------------------------------------- schedule
    def _root(self, req: _Request) -> bytes:
        """What the pages' contents depend on besides the tokens: the rotary base (dynamic NTK
        past max_position_embeddings keys the whole sequence on its length) and the cache dtype."""
        rope = req.rope_len if self._dynamic and req.rope_len > self._max_pos else 0
        return f"{np.dtype(self.cache_dtype).name}|{rope}".encode()

    def _ensure_pages(self, req: _Request, slots_needed: int) -> bool:
        missing = -(-slots_needed // self.page_size) - len(req.pages)
        if missing <= 0:
            return True
        pages = self.pool.allocate(missing)
        if pages is None:
            return False
        req.pages += pages
        return True

    def _preempt(self, req: _Request) -> None:
        """Back to the front of the queue; its pages are freed (full ones stay in the prefix cache)."""
        self.preemptions += 1
        self.pool.release(req.pages)
        req.pages, req.computed, req.keys = [], 0, []
        self.slots[req.slot] = None
        req.slot = None
        self.waiting.appendleft(req)

    def _schedule_decodes(self) -> list[_Request]:
        decoding = sorted((r for r in self.slots if r is not None and not r.prefilling), key=lambda r: r.arrival)
        kept = []
        while decoding:
            req = decoding.pop(0)
            while not self._ensure_pages(req, req.computed + 1):
                victim = max((r for r in self.slots if r is not None), key=lambda r: r.arrival)
                if victim in decoding:
                    decoding.remove(victim)
                if victim in kept:
                    kept.remove(victim)
                self._preempt(victim)
                if victim is req:
                    break
            if req.slot is not None:
                kept.append(req)
        return kept

    def _admit(self, req: _Request) -> bool:
        """Moves the first waiting request into a free slot, with the pages the prefix cache has of it."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not free:
            return False
        tokens = req.tokens
        if self.config.enable_prefix_caching:
            cacheable = (len(tokens) - 1) // self.page_size
            keys = page_keys(tokens[:cacheable * self.page_size], self.page_size, self._root(req))
            req.pages = self.pool.take_cached(keys)
            req.keys = keys[:len(req.pages)]
        req.computed = len(req.pages) * self.page_size
        req.slot = free[0]
        self.slots[req.slot] = req
        self.waiting.popleft()
        return True

    def _schedule_prefills(self, budget: int) -> list[tuple[_Request, int]]:
        chunks = []
        for req in sorted((r for r in self.slots if r is not None and r.prefilling), key=lambda r: r.arrival):
            planned, paged = self._plan_chunks(req, budget, chunks)
            budget -= planned
            if not paged:
                return chunks
        while budget > 0 and self.waiting:
            req = self.waiting[0]
            if not self._admit(req):
                break
            planned, paged = self._plan_chunks(req, budget, chunks) if req.prefilling else (0, True)
            budget -= planned
            if not paged:
                break
        return chunks

    def _plan_chunks(self, req: _Request, budget: int, chunks: list) -> tuple[int, bool]:
        """Schedules as much of the request's prompt as the budget allows, in chunks of bucket
        lengths; returns the tokens planned and whether pages held out (when they ran out,
        no later request is scheduled either: first come, first served).

        A chunk is run at its bucket's length, so one chunk of a length between buckets would
        compute up to 4x its tokens (buckets grow 4x); whole buckets (largest first) and only
        the last remainder padded keep the padding under the smallest bucket.
        """
        planned, left = 0, min(req.to_prefill, budget)
        while left > 0:
            fits = [c for c in self.chunk_buckets if c <= left]
            size = fits[-1] if fits else left
            if not self._ensure_pages(req, req.computed + planned + size):
                return planned, False
            chunks.append((req, size))
            planned, left = planned + size, left - size
        return planned, True

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """One iteration: decode every running request, prefill under the token budget, report."""
        with mesh_context(self.mesh):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        decodes = self._schedule_decodes()
        chunks = self._schedule_prefills(self.config.max_num_batched_tokens - len(decodes))
        touched = {}
        if decodes:
            self._run_decode(decodes)
            touched.update((r.id, r) for r in decodes)
        for req, size in chunks:
            if self._run_prefill(req, size):
                touched[req.id] = req
        return [out for out in (self._report(r) for r in touched.values()) if out is not None]

    def _width(self, slots_needed: int) -> int:
        pages = -(-slots_needed // self.page_size)
        return next(w for w in self.width_buckets if w >= pages)

    def _block_table(self, rows: list[_Request | None], width: int) -> np.ndarray:
        table = np.full((len(rows), width), NULL_PAGE, np.int32)
        for i, req in enumerate(rows):
            if req is not None:
                table[i, :len(req.pages[:width])] = req.pages[:width]
        return table

    def _params(self, rows: list[_Request | None]) -> SlotParams:
        get = lambda f, default: [default if r is None else f(r) for r in rows]
        return SlotParams(temperature=np.asarray(get(lambda r: r.params.temperature, 0.0), np.float32),
                          top_p=np.asarray(get(lambda r: r.params.top_p, 1.0), np.float32),
                          top_k=np.asarray(get(lambda r: r.params.top_k, 0), np.int32),
                          repetition_penalty=np.asarray(get(lambda r: r.params.repetition_penalty, 1.0), np.float32),
                          seed=np.asarray(get(lambda r: r.seed, 0), np.int32),
                          generated=np.asarray(get(lambda r: len(r.generated), 0), np.int32))

    def _run_decode(self, decodes: list[_Request]) -> None:
        rows = [r if r in decodes else None for r in self.slots]
        width = self._width(max(r.computed + 1 for r in decodes))
        tokens = np.asarray([0 if r is None else r.tokens[-1] for r in rows], np.int32)
        positions = np.asarray([0 if r is None else r.computed for r in rows], np.int32)
        rope = np.asarray([1 if r is None else r.rope_len for r in rows], np.int32)
        self.kv, self.seen, *out = programs.decode(
            self.graphdef, self.state, self.kv, self.seen, tokens, positions, self._block_table(rows, width),
            rope, self._params(rows))
        token, chosen, top_ids, top_values = jax.device_get(out)
        for i, req in enumerate(rows):
            if req is not None:
                req.computed += 1
                self._register_full_pages(req)
                self._accept(req, int(token[i]), float(chosen[i]), top_ids[i], top_values[i])

    def _run_prefill(self, req: _Request, size: int) -> bool:
        """Runs one chunk; True when it ended the prompt and so chose the request's first token."""
        start, tokens = req.computed, req.tokens
        C = next(c for c in self.chunk_buckets if c >= size)
        chunk = np.zeros((1, C), np.int32)
        chunk[0, :size] = tokens[start:start + size]
        seen = np.zeros((1, self.model.config.vocab_size), bool)
        seen[0, tokens] = True        # HF's repetition penalty counts the prompt's tokens too
        width = self._width(min(start + C, self.pages_per_row * self.page_size))
        self.kv, *out = programs.prefill(
            self.graphdef, self.state, self.kv, seen, chunk, np.asarray([start], np.int32), np.int32(size),
            self._block_table([req], width), np.asarray([req.rope_len], np.int32), self._params([req]))
        req.computed += size
        self._register_full_pages(req)
        if req.prefilling:
            return False
        self.seen = programs.set_row(self.seen, np.int32(req.slot), seen[0])
        if req.generated:   # recomputed after preemption: its next input is the last token it generated
            return False
        token, chosen, top_ids, top_values = jax.device_get(out)
        self._accept(req, int(token[0]), float(chosen[0]), top_ids[0], top_values[0])
        return True

    def _register_full_pages(self, req: _Request) -> None:
        full = min(req.computed, len(req.tokens)) // self.page_size
        if full <= len(req.keys) or not self.config.enable_prefix_caching:
            return
        req.keys = page_keys(req.tokens[:full * self.page_size], self.page_size, self._root(req))
        for page, key in zip(req.pages, req.keys):
            self.pool.register(page, key)

    # -------------------------------------------------------------- output
    def _accept(self, req: _Request, token: int, chosen: float, top_ids, top_values) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.generated.append(token)
        if req.params.logprobs is not None:
            top = [(int(i), float(v)) for i, v in zip(top_ids[:req.params.logprobs], top_values)]
            req.logprobs.append(TokenLogprob(token, chosen, top))
        if token in req.stop_ids:
            req.finish_reason = "stop"
        elif len(req.generated) >= req.params.max_tokens:
            req.finish_reason = "length"

    def _text(self, req: _Request) -> str:
        ids = req.generated[:-1] if req.finish_reason == "stop" and req.generated[-1] in req.stop_ids \
            else req.generated
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def _report(self, req: _Request) -> RequestOutput | None:
        text = self._text(req)
        finished = req.finish_reason is not None
        for stop in req.params.stop:
            at = text.find(stop, max(0, req.emitted - len(stop)))
            if at >= 0:
                text, finished = text[:at], True
                req.finish_reason = "stop"
        visible = len(text)
        if not finished:
            visible -= _held_back(text, req.params.stop)
        new_text = text[req.emitted:visible]
        new_tokens = req.generated[req.emitted_tokens:]
        if not new_text and not finished and not (req.params.logprobs is not None and new_tokens):
            return None
        req.emitted = max(req.emitted, visible)
        logprobs = req.logprobs[req.emitted_tokens:] if req.params.logprobs is not None else None
        req.emitted_tokens = len(req.generated)
        out = RequestOutput(req.id, new_text, new_tokens, logprobs, finished, req.finish_reason,
                            len(req.prompt), len(req.generated))
        if finished:
            self._finish(req, req.finish_reason)
        return out


def _held_back(text: str, stops) -> int:
    """Characters at the end of ``text`` not shown yet: the bytes of an unfinished character
    (decoded as U+FFFD until it completes), or a possible start of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold

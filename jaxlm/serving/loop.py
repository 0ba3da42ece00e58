"""`AsyncEngine`: the engine's step loop in one background thread, for asyncio callers.

`jaxlm.serving.engine.Engine` is synchronous and not thread-safe, so exactly
one thread, the loop thread started here, ever touches it. Callers (the HTTP
server's event loop) talk to it through a lock-protected inbox of commands
(add, abort); the loop thread hands each step's outputs back to the caller's
event loop with ``loop.call_soon_threadsafe`` onto a per-request
``asyncio.Queue``. When there is nothing to do the loop thread sleeps on a
condition variable (no spinning); a new command wakes it.

- ``submit`` / ``generate`` raise `QueueFullError` when ``max_num_seqs +
  max_queue`` requests are already in flight (the server answers 429),
  `EngineClosedError` once admission has stopped (503), and the engine's
  `RequestError` for an invalid request (400).
- A consumer that goes away (``RequestStream.cancel``, or leaving ``generate``
  early) aborts its requests at the loop thread's next iteration, which frees
  their pages then, not when their generation would have ended.
- ``n > 1`` siblings of one prompt (``submit(..., share_prefix=True)``) enter
  the engine only once the first of them has prefilled its prompt, so they
  take its full pages from the prefix cache instead of computing them again.
- ``shutdown`` stops admission, lets the requests in flight finish, then
  stops the thread.

Written here rather than taken from a library: the pieces are a thread, a
condition variable and asyncio queues, and the hand-off has to follow the
engine's own request lifecycle exactly.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import AsyncIterator, Sequence

from jaxlm.errors import JaxlmError
from jaxlm.serving import engine as engine_lib
from jaxlm.serving.params import RequestError, RequestOutput, SamplingParams

log = logging.getLogger("jaxlm.serving")


class QueueFullError(JaxlmError):
    """More requests than ``max_num_seqs + max_queue`` would be in flight (HTTP 429)."""


class EngineClosedError(JaxlmError):
    """The engine no longer admits requests: it is shutting down, or its thread failed (HTTP 503)."""


class EngineFailedError(JaxlmError):
    """An engine step raised; every request in flight at that moment ends with this error (HTTP 500)."""


_ADMITTED = object()   # first queue item of a stream whose requests the engine accepted


class Observer:
    """What the loop thread reports about each finished request (the server's metrics implement it)."""

    def request_finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                         ttft: float | None, tpot: float | None) -> None:
        """``ttft``: seconds from submission to the first token; ``tpot``: seconds per output
        token after the first, ``(latency - ttft) / (completion_tokens - 1)``."""


@dataclasses.dataclass
class _Add:
    ids: list[str]
    requests: list[tuple[list[int], SamplingParams, Sequence[int] | None]]
    share_prefix: bool
    sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue]
    arrival: float


@dataclasses.dataclass
class _Abort:
    ids: list[str]


class RequestStream:
    """The outputs of one submission (one or more engine requests), as they come.

    ``async for index, output in stream`` yields ``(index of the request in
    the submission, RequestOutput)``; iteration ends when every request has
    finished. ``cancel()`` aborts the unfinished ones (idempotent).
    """

    def __init__(self, owner: "AsyncEngine", ids: list[str], queue: asyncio.Queue):
        self._owner, self.ids, self._queue = owner, ids, queue
        self._index = {rid: i for i, rid in enumerate(ids)}
        self._finished: set[str] = set()
        self._failed = False

    @property
    def done(self) -> bool:
        return self._failed or len(self._finished) == len(self.ids)

    async def _admitted(self) -> None:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._failed = True
            raise item
        assert item is _ADMITTED, item

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._failed = True
            raise item
        if item.finished:
            self._finished.add(item.request_id)
        return self._index[item.request_id], item

    def cancel(self) -> None:
        if not self.done:
            self._owner._abort([rid for rid in self.ids if rid not in self._finished])
            self._failed = True


class AsyncEngine:
    """Runs ``engine`` in a background thread; see the module docstring."""

    def __init__(self, engine: engine_lib.Engine, max_queue: int | None = None, warmup: bool = True,
                 observer: Observer | None = None):
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                      or max_queue < 0):
            raise JaxlmError(f"max_queue: must be an integer >= 0 or None, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self._warmup = warmup
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        # the rest is the loop thread's, except where it takes self._cond
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._deferred: dict[str, list[tuple[str, tuple]]] = {}   # leader id -> siblings not yet added
        self._timing: dict[str, list] = {}       # id -> [submitted, first token, prompt tokens, tokens]
        self._active = 0                          # engine requests submitted and not yet finished
        self._accepting = True
        self._stopping = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.finished = collections.Counter()     # finish reason -> requests
        self.tokens_generated = 0
        self.ready = threading.Event()            # set once warm-up is done (or failed: see `error`)
        self.error: BaseException | None = None
        self.warmup_seconds: float | None = None
        self.stats: dict = self._snapshot()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "AsyncEngine":
        """Starts the loop thread (which warms the engine up first); returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Blocks until warm-up is done; re-raises its error if it failed."""
        if not self.ready.wait(timeout):
            raise JaxlmError(f"engine warm-up did not finish within {timeout} s")
        if self.error is not None:
            raise self.error

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and self._accepting and not self._stopping and self.error is None

    def stop_admission(self) -> None:
        """New submissions raise `EngineClosedError`; requests in flight go on."""
        with self._cond:
            self._accepting = False

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stops admission, lets the requests in flight finish, stops the thread.

        Returns False when the thread was still running after ``timeout``
        seconds (it is a daemon thread, so it does not keep the process alive).
        """
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def capacity(self) -> int | None:
        """Requests that may be in flight at once: the engine's slots plus ``max_queue`` waiting."""
        return None if self.max_queue is None else self.engine.config.max_num_seqs + self.max_queue

    # ------------------------------------------------------------ requests
    async def submit(self, requests: Sequence[tuple[Sequence[int], SamplingParams, Sequence[int] | None]],
                     share_prefix: bool = False) -> RequestStream:
        """Adds ``(prompt_ids, params, stop_token_ids)`` requests; returns their stream once the
        engine has accepted all of them, or raises what it refused one with.

        With ``share_prefix`` a request whose prompt equals an earlier one's in
        the same submission enters the engine once that one has prefilled
        (``n > 1``), so the prefix cache hands it the prompt's full pages.
        """
        if not requests:
            raise JaxlmError("submit: no requests")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cond:
            if self.error is not None or not self._accepting or self._stopping:
                raise EngineClosedError("the server is shutting down and accepts no new requests")
            if not self.ready.is_set():
                raise EngineClosedError("the engine is still warming up")
            cap = self.capacity
            if cap is not None and self._active + len(requests) > cap:
                raise QueueFullError(f"too many requests: {self._active} are running or waiting and the limit "
                                     f"is {cap} (max_num_seqs + max_queue); retry later")
            ids = [f"r{next(self._ids)}" for _ in requests]
            self._active += len(ids)
            for rid in ids:
                self._sinks[rid] = (loop, queue)
            self._inbox.append(_Add(ids, [(list(p), s, st) for p, s, st in requests], share_prefix,
                                    (loop, queue), time.monotonic()))
            self._cond.notify()
        stream = RequestStream(self, ids, queue)
        try:
            await stream._admitted()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        return stream

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       stop_token_ids: Sequence[int] | None = None) -> AsyncIterator[RequestOutput]:
        """The outputs of one request, step by step; leaving early aborts it.

        (A ``break`` out of ``async for`` aborts when the generator is closed,
        which asyncio does as soon as it is dropped; ``contextlib.aclosing``
        makes that point explicit.)
        """
        stream = await self.submit([(prompt_ids, params, stop_token_ids)])
        try:
            async for _, out in stream:
                yield out
        finally:
            stream.cancel()

    def _abort(self, ids: list[str]) -> None:
        if ids:
            with self._cond:
                self._inbox.append(_Abort(ids))
                self._cond.notify()

    # ---------------------------------------------------------- loop thread
    def _run(self) -> None:
        try:
            start = time.perf_counter()
            if self._warmup:
                self.engine.warmup()
            self.warmup_seconds = time.perf_counter() - start
        except BaseException as e:   # reported to whoever waits on `ready`
            self.error = e
            self.ready.set()
            return
        self.stats = self._snapshot()
        self.ready.set()
        while True:
            with self._cond:
                while not self._inbox and not self.engine.has_work() and not self._stopping:
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                if self._stopping and not commands and not self.engine.has_work() and not self._deferred:
                    break
            try:
                self._iteration(commands)
            except Exception as e:   # a bug: fail what is in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
            self.stats = self._snapshot()
        self.stats = self._snapshot()

    def _iteration(self, commands) -> None:
        for command in commands:
            if isinstance(command, _Add):
                self._add(command)
            else:
                self._handle_abort(command)
        if self.engine.has_work():
            self._deliver(self.engine.step())
            self._release_deferred()

    def _add(self, command: _Add) -> None:
        added, leaders = [], {}
        try:
            for rid, request in zip(command.ids, command.requests):
                self._timing[rid] = [command.arrival, None, len(request[0]), 0]
                key = tuple(request[0])
                if command.share_prefix and key in leaders:   # waits for the first with this prompt
                    self._deferred.setdefault(leaders[key], []).append((rid, request))
                    continue
                self._engine_add(rid, request)
                added.append(rid)
                leaders[key] = rid
        except Exception as e:   # RequestError: the caller's (400); anything else is reported as well
            for rid in added:
                self.engine.abort(rid)
                self._deferred.pop(rid, None)
            for rid in command.ids:
                self._timing.pop(rid, None)
            self._forget(command.ids)
            _put(command.sink, [e])
            return
        _put(command.sink, [_ADMITTED])

    def _engine_add(self, rid: str, request) -> None:
        prompt, params, stop_ids = request
        self.engine.add_request(prompt, params, request_id=rid, stop_token_ids=stop_ids)

    def _release_deferred(self) -> None:
        """Adds the siblings of every leader that has prefilled its prompt (or finished)."""
        for leader in list(self._deferred):
            req = self.engine.requests.get(leader)
            if req is not None and not req.generated:
                continue
            for rid, request in self._deferred.pop(leader):
                try:
                    self._engine_add(rid, request)
                except RequestError as e:   # not expected: the leader, the same request, was accepted
                    self._finish_with(rid, e, "abort")

    def _handle_abort(self, command: _Abort) -> None:
        for rid in command.ids:
            if rid not in self._sinks:
                continue   # it finished meanwhile
            for leader, rest in list(self._deferred.items()):
                self._deferred[leader] = [(r, q) for r, q in rest if r != rid]
            self.engine.abort(rid)
            self._finish_with(rid, RequestOutput(rid, "", [], None, True, "abort"), "abort")

    def _finish_with(self, rid: str, item, reason: str) -> None:
        sink = self._sinks.get(rid)
        self._done(rid, reason)
        self._forget([rid])
        if sink is not None:
            _put(sink, [item])

    def _forget(self, ids) -> None:
        with self._cond:
            for rid in ids:
                if self._sinks.pop(rid, None) is not None:
                    self._active -= 1

    def _done(self, rid: str, reason: str) -> None:
        self.finished[reason] += 1
        timing = self._timing.pop(rid, None)
        if timing is None:
            return
        arrival, first, prompt_tokens, tokens = timing
        now = time.monotonic()
        ttft = None if first is None else first - arrival
        tpot = (now - first) / (tokens - 1) if first is not None and tokens > 1 else None
        try:
            self.observer.request_finished(reason, prompt_tokens, tokens, ttft, tpot)
        except Exception:
            log.exception("metrics observer failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_sink: dict[int, tuple[tuple, list]] = {}
        finished = []
        now = time.monotonic()
        for out in outputs:
            self.tokens_generated += len(out.token_ids)
            timing = self._timing.get(out.request_id)
            if timing is not None and out.token_ids:
                if timing[1] is None:
                    timing[1] = now
                timing[3] += len(out.token_ids)
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            by_sink.setdefault(id(sink[1]), (sink, []))[1].append(out)
            if out.finished:
                finished.append(out.request_id)
                self._done(out.request_id, out.finish_reason)
        self._forget(finished)
        for sink, items in by_sink.values():
            _put(sink, items)

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailedError(f"the engine failed: {type(error).__name__}: {error}")
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        self._deferred.clear()
        for rid in list(self._sinks):
            self._finish_with(rid, failure, "error")

    def _snapshot(self) -> dict:
        eng, pool = self.engine, self.engine.pool
        with self._cond:
            pending = sum(len(c.ids) for c in self._inbox if isinstance(c, _Add))
        return dict(running=eng.num_running(),
                    waiting=len(eng.waiting) + pending + sum(len(v) for v in self._deferred.values()),
                    pages_used=pool.used(), pages_total=pool.num_pages - 1, hit_rate=pool.hit_rate(),
                    prefix_hits=pool.hits, prefix_lookups=pool.lookups, preemptions=eng.preemptions,
                    finished=dict(self.finished), tokens_generated=self.tokens_generated)


def _put(sink: tuple[asyncio.AbstractEventLoop, asyncio.Queue], items: list) -> None:
    loop, queue = sink
    try:
        loop.call_soon_threadsafe(_put_all, queue, items)
    except RuntimeError:   # the caller's event loop is closed: nobody is listening any more
        pass


def _put_all(queue: asyncio.Queue, items: list) -> None:
    for item in items:
        queue.put_nowait(item)

"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over `jaxlm.serving.loop.AsyncEngine`.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /metrics`` (Prometheus). ``GET /`` is a chat
page over the streamed chat endpoint (`jaxlm.serving.web`). Requests take
OpenAI's fields plus vLLM's ``top_k``, ``repetition_penalty``, ``ignore_eos``,
``stop_token_ids`` and ``skip_special_tokens``; errors come in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.

The protocol itself (request schemas, errors, chat rendering, tool calls,
logprobs) is `jaxlm.serving.protocol`; this module is the app around the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxlm.serving.loop import AsyncEngine, EngineClosedError, EngineFailedError, QueueFullError, RequestStream
from jaxlm.serving.metrics import ServerMetrics
from jaxlm.serving.params import MAX_TOP_LOGPROBS, RequestError, SamplingParams
from jaxlm.serving.protocol import (APIError, ChatRequest, CommonFields, CompletionRequest, Tokens, bad_param,
                                    chat_logprobs, completion_logprobs, encode_chat, error_body, error_response,
                                    parse_reply)
from jaxlm.serving.web import add_chat_page

log = logging.getLogger("jaxlm.serving")

DISCONNECT_POLL_S = 0.25   # how often a non-streaming request checks that its client is still there


# ----------------------------------------------------------------- the app
class _Choice:
    """What one engine request has produced so far."""

    def __init__(self):
        self.text, self.token_ids, self.logprobs = "", [], []
        self.finish_reason = None
        self.prompt_tokens = self.completion_tokens = 0

    def add(self, out) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.finished:
            self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens


class _EngineStreamResponse(StreamingResponse):
    """Server-sent events whose requests are aborted however the response ends.

    Starlette cancels the body when the client disconnects (uvicorn's ASGI
    2.3 ``http.disconnect``); the ``finally`` here runs in every case, so a
    client that goes away frees its requests' pages at once.
    """

    def __init__(self, content, stream: RequestStream):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._request_stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._request_stream.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(choices: list[_Choice], prompt_tokens: int) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


class _App:
    def __init__(self, engine: AsyncEngine, tokenizer, model_name: str, max_model_len: int,
                 api_key: str | None, metrics: ServerMetrics):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.max_model_len, self.api_key, self.metrics = max_model_len, api_key, metrics
        self.tokens = Tokens(tokenizer)
        self.created = int(time.time())
        eos = set(engine.engine.default_stop) | {tokenizer.eos_token_id}
        im_end = tokenizer.special_tokens.get("<|im_end|>")
        if im_end is not None:
            eos.add(im_end)
        self.chat_stop_ids = sorted(eos)

    # ------------------------------------------------------------ checks
    def check_model(self, name) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def params(self, body: CommonFields, max_tokens: int, logprobs: int | None, skip_special_tokens: bool,
               prompt_len: int, prompt_param: str, index: int = 0) -> SamplingParams:
        n = 1 if body.n is None else body.n
        if n < 1:
            raise bad_param("n", f"must be an integer >= 1, got {n}")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise bad_param(name, "is not supported (use repetition_penalty)")
        if body.logit_bias:
            raise bad_param("logit_bias", "is not supported")
        if prompt_len >= self.max_model_len:
            raise bad_param(prompt_param, f"the prompt ({prompt_len} tokens) leaves no room for output within "
                                     f"max_model_len ({self.max_model_len})")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            seed=None if body.seed is None else body.seed + index, stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos), logprobs=logprobs,
            skip_special_tokens=skip_special_tokens)
        if prompt_len + params.max_tokens > self.max_model_len:
            raise bad_param("max_tokens", f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) "
                                     f"exceeds max_model_len ({self.max_model_len})")
        return params

    async def submit(self, requests, share_prefix: bool) -> RequestStream:
        try:
            return await self.engine.submit(requests, share_prefix=share_prefix)
        except RequestError as e:
            raise bad_param(e.param, str(e).removeprefix(f"{e.param}: "))
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded")
        except EngineClosedError as e:
            raise APIError(503, str(e), type="service_unavailable", code="service_unavailable")

    async def collect(self, request: Request, stream: RequestStream, count: int) -> list[_Choice]:
        """Every choice's whole result; a client that disconnects meanwhile aborts them."""
        choices = [_Choice() for _ in range(count)]

        async def drain():
            async for index, out in stream:
                choices[index].add(out)

        task = asyncio.ensure_future(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return choices
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection", code="client_closed_request")
        except EngineFailedError as e:
            raise APIError(500, str(e), type="internal_error", code="engine_failed")
        finally:
            task.cancel()
            stream.cancel()

    # -------------------------------------------------------- completions
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        if body.echo:
            raise bad_param("echo", "is not supported")
        if body.suffix:
            raise bad_param("suffix", "is not supported")
        n = 1 if body.n is None else body.n
        if body.best_of is not None and body.best_of != n:
            raise bad_param("best_of", "is not supported (other than equal to n)")
        prompts = self.completion_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        requests = []
        for prompt in prompts:
            for j in range(max(n, 1)):
                params = self.params(body, max_tokens, body.logprobs, body.skip_special_tokens is not False,
                                     len(prompt), "prompt", j)
                requests.append((prompt, params, None))
        stream = await self.submit(requests, share_prefix=n > 1)
        prompt_tokens = sum(len(p) for p in prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _EngineStreamResponse(self.completion_events(stream, rid, created, len(requests), prompt_tokens,
                                                                body), stream)
        choices = await self.collect(request, stream, len(requests))
        out = []
        for i, c in enumerate(choices):
            choice = {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                      "logprobs": None if body.logprobs is None else completion_logprobs(self.tokens, c.logprobs, 0)}
            if body.return_token_ids:
                choice.update(prompt_token_ids=requests[i][0], token_ids=c.token_ids)
            out.append(choice)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": out, "usage": _usage(choices, prompt_tokens)}

    def completion_prompts(self, prompt) -> list[list[int]]:
        """A string (encoded with BOS), token ids (as given), or a list of either."""
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise bad_param("prompt", "must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p))
            elif not p:
                raise bad_param("prompt", "a token-id prompt must not be empty")
            else:
                out.append(list(p))
        return out

    async def completion_events(self, stream, rid, created, count, prompt_tokens, body):
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        choices = [_Choice() for _ in range(count)]
        offsets = [0] * count
        async def events():
            async for index, out in stream:
                choices[index].add(out)
                if not out.text and not out.finished and not out.logprobs:
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = completion_logprobs(self.tokens, out.logprobs or [], offsets[index])
                offsets[index] += len(out.text)
                chunk = dict(head, choices=[{"index": index, "text": out.text, "logprobs": logprobs,
                                             "finish_reason": out.finish_reason if out.finished else None}])
                if body.return_token_ids:
                    chunk["choices"][0]["token_ids"] = out.token_ids
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
        async for event in _end_of_stream(events(), head, choices, prompt_tokens, include_usage):
            yield event

    # --------------------------------------------------------------- chat
    async def chat(self, body: ChatRequest, request: Request):
        self.check_model(body.model)
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        prompt = encode_chat(self.tokenizer, body.messages, tools, body.tool_choice)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise bad_param("top_logprobs", "needs logprobs: true")
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_param("top_logprobs", f"must be in 0..{MAX_TOP_LOGPROBS}, got {body.top_logprobs}")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(self.max_model_len - len(prompt), 1)
        n = 1 if body.n is None else body.n
        requests = [(prompt, self.params(body, max_tokens, logprobs, body.skip_special_tokens is not False,
                                         len(prompt), "messages", j), self.chat_stop_ids)
                    for j in range(max(n, 1))]
        stream = await self.submit(requests, share_prefix=n > 1)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _EngineStreamResponse(self.chat_events(stream, rid, created, len(requests), len(prompt), body,
                                                          tools is not None), stream)
        choices = await self.collect(request, stream, len(requests))
        out = []
        for i, c in enumerate(choices):
            content, tool_calls = parse_reply(self.tokenizer, self._reply_ids(c), c.text) if tools \
                else (c.text, None)
            message = {"role": "assistant", "content": content}
            if tool_calls:
                message["tool_calls"] = tool_calls
            choice = {"index": i, "message": message,
                      "logprobs": chat_logprobs(self.tokens, c.logprobs) if body.logprobs else None,
                      "finish_reason": "tool_calls" if tool_calls else c.finish_reason}
            if body.return_token_ids:
                choice.update(prompt_token_ids=prompt, token_ids=c.token_ids)
            out.append(choice)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": out, "usage": _usage(choices, len(prompt))}

    def _reply_ids(self, choice: _Choice) -> list[int]:
        ids = choice.token_ids
        return ids[:-1] if ids and choice.finish_reason == "stop" and ids[-1] in self.chat_stop_ids else ids

    async def chat_events(self, stream, rid, created, count, prompt_tokens, body, tools: bool):
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        action_start = self.tokenizer.special_tokens.get("<|action_start|>")
        choices = [_Choice() for _ in range(count)]
        sent = [""] * count          # content streamed so far
        held = [False] * count       # a tool call began: its text is held back, parsed at the end

        def chunk(index, delta, finish_reason=None, logprobs=None):
            c = dict(head, choices=[{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}])
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def events():
            for i in range(count):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, out in stream:
                c = choices[i]
                c.add(out)
                text = out.text
                if tools and not held[i] and action_start in out.token_ids:
                    held[i] = True
                    ids = c.token_ids[:c.token_ids.index(action_start)]
                    thought = self.tokenizer.decode(ids, skip_special_tokens=True)
                    text = thought[len(sent[i]):] if thought.startswith(sent[i]) else ""
                elif held[i]:
                    text = ""
                logprobs = chat_logprobs(self.tokens, out.logprobs or []) if body.logprobs else None
                if text or (logprobs and logprobs["content"]):
                    sent[i] += text
                    yield chunk(i, {"content": text}, logprobs=logprobs)
                if out.finished:
                    finish = out.finish_reason
                    if held[i]:
                        _, tool_calls = parse_reply(self.tokenizer, self._reply_ids(c), c.text)
                        if tool_calls:
                            yield chunk(i, {"tool_calls": [dict(tc, index=k) for k, tc in enumerate(tool_calls)]})
                            finish = "tool_calls"
                        elif c.text[len(sent[i]):]:
                            yield chunk(i, {"content": c.text[len(sent[i]):]})
                    yield chunk(i, {}, finish)
        async for event in _end_of_stream(events(), head, choices, prompt_tokens, include_usage):
            yield event


class _APIKeyMiddleware:
    """Every /v1 route wants ``Authorization: Bearer KEY`` (/health and /metrics stay open).

    A plain ASGI middleware (Starlette's BaseHTTPMiddleware would wrap the
    event streams and hide client disconnects), checked before the body is read.
    """

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(APIError(401, "invalid or missing API key (send Authorization: "
                                                         "Bearer KEY)", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, tokenizer, *, model_name: str, max_model_len: int | None = None,
              api_key: str | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app over a started `AsyncEngine` (whose observer should be ``metrics``)."""
    metrics = metrics or ServerMetrics()
    if not isinstance(engine.observer, ServerMetrics):
        engine.observer = metrics
    metrics.attach(engine)
    state = _App(engine, tokenizer, model_name, max_model_len or engine.engine.max_model_len, api_key, metrics)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()   # no-op when started already (the serve command starts and warms it first)
        yield
        # uvicorn has let the requests in flight finish (or cancelled them after its graceful timeout)
        await asyncio.to_thread(engine.shutdown, 10.0)

    app = FastAPI(title="jaxlm", description="OpenAI-compatible InternLM2 server", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.jaxlm = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error_response(bad_param(e.param, str(e).removeprefix(f"{e.param}: ")))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON: {first.get('msg', '')}"))
        if not loc:
            return error_response(APIError(400, "the request body must be a JSON object (sent with "
                                                 "Content-Type: application/json)"))
        param, where = loc[0], ".".join(loc)
        return error_response(APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error"))

    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "jaxlm", "max_model_len": state.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await state.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await state.chat(body, request)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    add_chat_page(app, model_name=model_name, max_model_len=state.max_model_len, api_key_required=api_key is not None)
    return app


async def _end_of_stream(events, head, choices, prompt_tokens, include_usage):
    """Every SSE stream ends alike: an engine failure as an error event, else the usage
    chunk (when asked for), then ``[DONE]``."""
    try:
        async for event in events:
            yield event
    except EngineFailedError as e:
        yield _sse(error_body(str(e), "internal_error", code="engine_failed"))
    else:
        if include_usage:
            yield _sse(dict(head, choices=[], usage=_usage(choices, prompt_tokens)))
    yield "data: [DONE]\n\n"

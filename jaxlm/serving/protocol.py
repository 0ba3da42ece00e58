"""The OpenAI protocol of `jaxlm serve`: request schemas, errors in OpenAI's shape, InternLM2's
chat rendering of messages and tools, replies parsed back into tool calls, and logprobs.

Everything here is a pure function of the request and the tokenizer; the HTTP
app (`jaxlm.serving.server`) and the tests call it, and it never sees the engine.
Chat messages are rendered with InternLM2's chatml exactly as ``model.chat``
renders its prompt (`jaxlm.chat.render_messages` after BOS; a system turn only
when a system message is given). ``tools`` become InternLM2's plugin system
turn (``<|im_start|>system name=<|plugin|>`` holding the functions as JSON,
after the first system message, as LMDeploy renders them); a reply holding
``<|action_start|><|plugin|>`` is parsed with `jaxlm.chat.parse_tool_call`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from jaxlm.chat import format_tool_call, parse_tool_call
from jaxlm.errors import JaxlmError

CHAT_ROLES = ("system", "user", "assistant", "tool", "environment")


# ------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def bad_param(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


# ---------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonFields(BaseModel):
    model_config = ConfigDict(extra="ignore")   # unknown OpenAI fields are accepted and ignored

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = True
    return_token_ids: bool | None = False   # each choice also carries prompt_token_ids and token_ids


class CompletionRequest(CommonFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(CommonFields):
    messages: list[Any]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict | None = None


# ------------------------------------------------------------- chat format
def _content_text(content, i: int, role: str) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise bad_param("messages", f"messages[{i}]: a {role} message needs 'content'")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_param("messages", f"messages[{i}]: only text content parts are supported, got {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_param("messages", f"messages[{i}]: 'content' must be a string or a list of text parts")


def tools_message(tools) -> dict:
    """InternLM2's plugin system turn for OpenAI ``tools`` (the functions as one JSON list)."""
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise bad_param("tools", f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        functions.append(fn)
    return {"role": "system", "name": "plugin", "content": json.dumps(functions, ensure_ascii=False)}


def chat_messages(messages, tools=None, tool_choice=None) -> list[dict]:
    """OpenAI messages -> the messages `jaxlm.chat.render_messages` renders.

    ``tool`` results become ``environment`` turns named ``plugin``; an
    assistant turn's ``tool_calls`` are written back with
    `jaxlm.chat.format_tool_call`; ``tools`` add the plugin system turn after
    the first system message (before everything else without one).
    """
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_param("messages", f"messages[{i}]: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad_param("messages", f"messages[{i}]: role {role!r} is unknown; expected one of {CHAT_ROLES}")
        content = _content_text(message.get("content"), i, role)
        if role == "assistant" and message.get("tool_calls"):
            for call in message["tool_calls"]:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_param("messages", f"messages[{i}]: each tool call needs a function with a name")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise bad_param("messages", f"messages[{i}]: tool call arguments are not JSON: {args!r:.80}")
                content += format_tool_call(fn["name"], args)
        if role == "tool":
            out.append({"role": "environment", "name": "plugin", "content": content})
        elif role == "environment" and message.get("name"):
            out.append({"role": role, "name": message["name"], "content": content})
        else:   # OpenAI's participant `name` has no place in InternLM2's format
            out.append({"role": role, "content": content})
    if tools and tool_choice != "none":
        at = 1 if out[0]["role"] == "system" and not out[0].get("name") else 0
        out.insert(at, tools_message(tools))
    return out


def encode_chat(tokenizer, messages, tools=None, tool_choice=None) -> list[int]:
    """BOS + InternLM2 chatml + ``<|im_start|>assistant\\n``, as ``model.chat`` builds its prompt."""
    try:
        return tokenizer.apply_chat_template(chat_messages(messages, tools, tool_choice), tokenize=True)
    except JaxlmError as e:
        raise bad_param("messages", str(e).removeprefix("messages: ")) from None


def parse_reply(tokenizer, token_ids, text: str) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of a chat reply. ``text`` is its content decoded with special tokens
    skipped; the tool call is parsed from ``token_ids`` decoded with them kept."""
    start = tokenizer.special_tokens.get("<|action_start|>")
    if start is None or start not in token_ids:
        return text, None
    try:
        call = parse_tool_call(tokenizer.decode(token_ids, skip_special_tokens=False))
    except JaxlmError:
        return text, None   # not a well-formed call: plain text
    if call is None or call.kind != "plugin":
        return text, None
    tool_call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.parameters, ensure_ascii=False)}}
    return call.thought or None, [tool_call]


# ---------------------------------------------------------------- logprobs
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokens:
    """Token strings and bytes for logprobs (a byte-fallback piece is its one byte)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        if token_id not in self._cache:
            tok = self.tokenizer
            if token_id in tok.special_ids:
                raw = tok.special_ids[token_id].encode()
            else:
                piece = tok.convert_ids_to_tokens([token_id])[0]
                m = _BYTE_PIECE.fullmatch(piece)
                raw = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
            self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return self._cache[token_id]


def completion_logprobs(tokens: Tokens, steps, offset: int) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for step in steps:
        text, _ = tokens(step.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(step.logprob)
        out["top_logprobs"].append({tokens(i)[0]: v for i, v in step.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokens: Tokens, steps) -> dict:
    def entry(token_id, logprob):
        text, raw = tokens(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(entry(s.token_id, s.logprob), top_logprobs=[entry(i, v) for i, v in s.top])
                        for s in steps]}

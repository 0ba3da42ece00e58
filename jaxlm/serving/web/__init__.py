"""The chat page of `jaxlm serve`: ``GET /`` and its static files, shipped inside the package.

Plain HTML, CSS and JavaScript in ``static/`` (no build step, nothing fetched
from elsewhere) that talk only to the same server's streamed
``/v1/chat/completions``. The page's settings start from ``model.chat``'s
defaults, read here from `jaxlm.runtime.generate.chat`'s signature so that
they are written down once, and served as JSON at ``GET /chat/defaults``.
"""

from __future__ import annotations

import inspect
import os

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from jaxlm.runtime.generate import chat as model_chat

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def chat_defaults(max_model_len: int) -> dict:
    """``model.chat``'s system prompt and sampling settings, as the page's settings start.

    ``max_tokens`` is model.chat's ``max_new_tokens``, capped at half the
    server's ``max_model_len`` so that a conversation on a short-context
    server still leaves room for its prompt (the server refuses a prompt plus
    max_tokens beyond max_model_len).
    """
    params = inspect.signature(model_chat).parameters
    return {"system_prompt": params["meta_instruction"].default,
            "temperature": params["temperature"].default,
            "top_p": params["top_p"].default,
            "max_tokens": max(1, min(params["max_new_tokens"].default, max_model_len // 2))}


def add_chat_page(app: FastAPI, *, model_name: str, max_model_len: int, api_key_required: bool) -> None:
    """``GET /`` (the page), ``GET /static/...`` (its script and style), ``GET /chat/defaults``.

    These stay open under ``--api-key`` (only /v1 routes want the key): the
    page itself asks for the key and sends it as a bearer token.
    """
    defaults = dict(chat_defaults(max_model_len), model=model_name, max_model_len=max_model_len,
                    api_key_required=api_key_required)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/chat/defaults", include_in_schema=False)
    async def page_defaults():
        return defaults

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

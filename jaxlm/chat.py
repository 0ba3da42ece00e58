"""InternLM2's chatml format: prompts, the chat template, and tool calls.

The prompt of ``model.chat`` is built exactly as the original
``InternLM2ForCausalLM.build_inputs`` does; tool calls use InternLM2's
``<|action_start|><|plugin|>`` convention.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

from jaxlm.errors import JaxlmError

# The original chat()'s default system prompt (modeling_internlm2.py).
DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文."
)
ROLES = ("system", "user", "assistant", "environment")
TOOL_NAMES = ("plugin", "interpreter")


def build_prompt(query: str, history: Sequence[Sequence[str]] = (), meta_instruction: str = "") -> str:
    """The text after BOS of the original ``build_inputs``."""
    prompt = ""
    if meta_instruction:
        prompt += f"<|im_start|>system\n{meta_instruction}<|im_end|>\n"
    for turn in history or ():
        if len(turn) != 2:
            raise JaxlmError(f"history: each turn must be (query, response), got {turn!r}")
        prompt += f"<|im_start|>user\n{turn[0]}<|im_end|>\n<|im_start|>assistant\n{turn[1]}<|im_end|>\n"
    prompt += f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return prompt


def _tool_token(name: str) -> str:
    bare = name.strip("<|>")
    if bare not in TOOL_NAMES:
        raise JaxlmError(f"messages: tool name {name!r} is unknown; expected one of {TOOL_NAMES}")
    return f"<|{bare}|>"


def render_messages(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """chatml for OpenAI-style messages (without the leading BOS)."""
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise JaxlmError(f"messages[{i}]: expected a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise JaxlmError(f"messages[{i}]: role {role!r} is unknown; expected one of {ROLES}")
        header = role
        if message.get("name"):
            header += f" name={_tool_token(message['name'])}"
        out.append(f"<|im_start|>{header}\n{message['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


@dataclasses.dataclass
class ToolCall:
    kind: str                   # "plugin" or "interpreter"
    name: str | None            # the plugin's function name
    parameters: Any             # plugin arguments, or {"code": ...} for the interpreter
    thought: str                # text before the call


_ACTION = re.compile(r"<\|action_start\|>\s*<\|(plugin|interpreter)\|>\s*(.*?)\s*<\|action_end\|>", re.DOTALL)


def parse_tool_call(text: str) -> ToolCall | None:
    """Parses an assistant turn decoded with special tokens kept.

    ``"thought<|action_start|><|plugin|>\\n{"name": ..., "parameters": {...}}<|action_end|>"``
    -> ``ToolCall("plugin", name, parameters, "thought")``; None if there is no call.
    """
    match = _ACTION.search(text)
    if match is None:
        return None
    kind, body = match.group(1), match.group(2)
    thought = text[: match.start()].strip()
    if kind == "interpreter":
        code = re.sub(r"^```(?:python)?\s*|\s*```$", "", body.strip())
        return ToolCall("interpreter", None, {"code": code}, thought)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        raise JaxlmError(f"tool call: invalid JSON in plugin call ({e}): {body[:80]!r}") from None
    if not isinstance(call, dict) or "name" not in call:
        raise JaxlmError(f"tool call: expected {{'name': ..., 'parameters': ...}}, got {body[:80]!r}")
    return ToolCall("plugin", call["name"], call.get("parameters", call.get("arguments", {})), thought)


def format_tool_call(name: str, parameters: Any, thought: str = "") -> str:
    """The assistant text of a plugin call (inverse of `parse_tool_call`)."""
    call = json.dumps({"name": name, "parameters": parameters}, ensure_ascii=False)
    return f"{thought}<|action_start|><|plugin|>\n{call}<|action_end|>\n"


def tool_result_message(result: Any, name: str = "plugin") -> dict:
    """A tool's result as the environment message that answers a call."""
    content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return {"role": "environment", "name": name, "content": content}

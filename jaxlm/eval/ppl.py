"""Sliding-window perplexity (HF's recipe): windows of ``context`` tokens every ``stride``,
each scoring only the tokens the previous window did not."""

from __future__ import annotations

import json
import math

import numpy as np

from jaxlm.errors import JaxlmError
from jaxlm.train.step import token_losses


def read_text(path: str) -> str:
    """Plain text, or JSONL with a ``text`` field per line."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except OSError as e:
        raise JaxlmError(f"{path}: cannot read ({e.strerror})") from None
    if path.endswith(".jsonl"):
        parts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    parts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise JaxlmError(f"{path}:{number}: expected {{'text': ...}}") from None
        return "\n\n".join(parts)
    return raw


def perplexity(model, ids: list[int], context: int, stride: int, chunk: int | None = None) -> dict:
    if context < 2 or stride < 1 or stride > context:
        raise JaxlmError(f"--context ({context}) must be >= 2 and --stride ({stride}) in 1..context")
    if len(ids) < 2:
        raise JaxlmError("the text has fewer than 2 tokens")
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        target_len = end - prev_end  # tokens no earlier window has scored
        window = np.asarray([ids[begin:end]])
        logits = np.asarray(model(window, chunk_size=chunk))[0]
        losses = np.asarray(token_losses(logits[:-1], window[0, 1:]))   # losses[i] predicts token i + 1
        scored = losses[max(window.shape[1] - target_len - 1, 0):]
        nll += float(scored.sum())
        count += scored.size
        prev_end, windows = end, windows + 1
        if end == len(ids):
            break
    return {"tokens": len(ids), "windows": windows, "scored": count, "nll": nll / count,
            "perplexity": math.exp(nll / count)}

"""Training data: JSONL chats or text -> packed rows with loss weights.

- Chat lines ``{"messages": [{"role", "content"}, ...]}`` are rendered with the
  chatml template; only assistant tokens count in the loss, each turn's
  ``<|im_end|>`` included.
- Text lines ``{"text": ...}`` (continued pre-training) count every token.
- Packing puts several examples in a row of ``seq_len`` tokens with segment ids
  and positions restarting per example (attention never crosses examples).
- Order is a deterministic function of (seed, epoch); the iterator state is
  two integers, saved in checkpoints so a resumed run sees the same batches.
- A malformed line is skipped and reported with its line number (``strict``
  fails fast instead); over-long examples are truncated and counted.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Iterator

import numpy as np

from jaxlm.chat import ROLES, render_messages
from jaxlm.errors import JaxlmError


@dataclasses.dataclass
class DataReport:
    examples: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0

    def summary(self) -> str:
        text = f"{self.examples} examples"
        if self.truncated:
            text += f", {self.truncated} truncated"
        if self.skipped:
            text += f", {len(self.skipped)} malformed lines skipped"
        return text


def _check_messages(row) -> list[dict]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected {'messages': [...]} with at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a role in {ROLES} and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[float]]:
    """Token ids of the whole chat and a 0/1 weight per token (1: assistant content + <|im_end|>).

    Messages are encoded one by one; special tokens separate them, so the
    concatenation equals encoding the whole rendered chat at once.
    """
    ids = [tokenizer.bos_token_id]
    weights = [0.0]
    im_end = tokenizer.token_to_id("<|im_end|>")
    for message in messages:
        text = render_messages([message], add_generation_prompt=False)
        part = tokenizer.encode(text, add_special_tokens=False)
        learn = message["role"] == "assistant"
        w = [0.0] * len(part)
        if learn:
            header = text[: text.index("\n") + 1]          # "<|im_start|>assistant\n"
            start = len(tokenizer.encode(header, add_special_tokens=False))
            end = part.index(im_end, start) + 1 if im_end in part[start:] else len(part)
            w[start:end] = [1.0] * (end - start)
        ids += part
        weights += w
    return ids, weights


def encode_text(tokenizer, text: str) -> tuple[list[int], list[float]]:
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    return ids, [1.0] * len(ids)


def load_examples(paths, tokenizer, *, kind: str, max_tokens: int, strict: bool = False,
                  report: DataReport | None = None) -> list[tuple[list[int], list[float]]]:
    """Reads JSONL files into (ids, weights) examples of at most ``max_tokens``."""
    report = report if report is not None else DataReport()
    if kind not in ("chat", "text"):
        raise JaxlmError(f"data.format: expected 'chat' or 'text', got {kind!r}")
    examples = []
    for path in [paths] if isinstance(paths, str) else paths:
        try:
            handle = open(path, encoding="utf-8")
        except OSError as e:
            raise JaxlmError(f"{path}: cannot read data file ({e.strerror})") from None
        with handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if kind == "chat":
                        ids, weights = encode_chat(tokenizer, _check_messages(row))
                    else:
                        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                            raise ValueError("expected {'text': '...'}")
                        ids, weights = encode_text(tokenizer, row["text"])
                except (ValueError, TypeError) as e:
                    problem = f"{path}:{number}: {e}"
                    if strict:
                        raise JaxlmError(f"malformed data line: {problem}") from None
                    report.skipped.append(problem)
                    print(f"warning: skipping {problem}", file=sys.stderr)
                    continue
                if len(ids) > max_tokens:
                    ids, weights = ids[:max_tokens], weights[:max_tokens]
                    report.truncated += 1
                if len(ids) >= 2 and sum(weights[1:]) > 0:
                    examples.append((ids, weights))
                    report.examples += 1
    if not examples:
        raise JaxlmError(f"no usable training examples in {paths}")
    return examples


def pack(examples, seq_len: int, pad_id: int, order=None) -> dict[str, np.ndarray]:
    """Packs examples (in ``order``) into rows of ``seq_len`` next-token pairs.

    Returns arrays ``[rows, seq_len]``: input_ids, targets, loss_weights,
    segment_ids (1, 2, ... per example; 0 for padding) and position_ids.
    """
    order = range(len(examples)) if order is None else order
    rows, current, used = [], [], 0
    for i in order:
        n = len(examples[i][0]) - 1  # next-token pairs in this example
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids",
                                                                 "position_ids")}
    out["input_ids"][:] = pad_id
    out["loss_weights"] = np.zeros((len(rows), seq_len), np.float32)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, 1):
            ids, weights = examples[i]
            n = len(ids) - 1
            out["input_ids"][r, at:at + n] = ids[:-1]
            out["targets"][r, at:at + n] = ids[1:]
            out["loss_weights"][r, at:at + n] = weights[1:]
            out["segment_ids"][r, at:at + n] = seg
            out["position_ids"][r, at:at + n] = np.arange(n)
            at += n
    return out


@dataclasses.dataclass
class DataState:
    epoch: int = 0
    row: int = 0


class PackedBatches:
    """Deterministic, resumable batches of packed rows."""

    def __init__(self, examples, *, seq_len: int, batch_size: int, seed: int, pad_id: int,
                 shuffle: bool = True, state: DataState | None = None):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.seed, self.pad_id, self.shuffle = seed, pad_id, shuffle
        self.state = state or DataState()
        self._epoch_rows: tuple[int, dict] | None = None

    def _rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            self._epoch_rows = (epoch, pack(self.examples, self.seq_len, self.pad_id, order))
        return self._epoch_rows[1]

    def rows_per_epoch(self) -> int:
        return len(self._rows(0)["input_ids"])

    def next(self) -> dict[str, np.ndarray]:
        """The next ``batch_size`` rows (wrapping into the next epoch's order)."""
        parts = {k: [] for k in ("input_ids", "targets", "loss_weights", "segment_ids", "position_ids")}
        need = self.batch_size
        while need:
            rows = self._rows(self.state.epoch)
            take = min(need, len(rows["input_ids"]) - self.state.row)
            for k in parts:
                parts[k].append(rows[k][self.state.row:self.state.row + take])
            self.state.row += take
            need -= take
            if self.state.row >= len(rows["input_ids"]):
                self.state = DataState(self.state.epoch + 1, 0)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()

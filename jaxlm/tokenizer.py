"""The InternLM2 tokenizer: SentencePiece plus HF's special-token handling.

Reproduces the original ``tokenization_internlm2.InternLM2Tokenizer`` as run by
HF transformers, without torch or transformers:

- special-token strings written in text (``<|im_start|>``, ``</s>`` ...) become
  their ids; the text between them is encoded by SentencePiece on its own, so a
  space before a special token is its own piece (``▁``);
- ``decode(..., skip_special_tokens=False)`` follows the original's
  ``convert_tokens_to_string``: a space is inserted before a special token that
  follows ordinary text (hence ``"<|im_start|> system"`` in decoded prompts).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from jaxlm.chat import render_messages
from jaxlm.checkpoint.hub import resolve_model_path
from jaxlm.errors import JaxlmError

TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
# The chat tokens of InternLM2, named in tokenizer_config.json's added_tokens_decoder.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
               "<|interpreter|>", "<|plugin|>")


def _load_sentencepiece(path: str):
    import sentencepiece as spm

    # sentencepiece >= 0.2.1 logs a warning per unusual piece straight to fd 2
    # while loading (e.g. the "\0" byte piece of InternLM2's model). Silence
    # exactly that load; real failures still raise.
    try:
        saved = os.dup(2)
    except OSError:
        saved = None
    try:
        if saved is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        return spm.SentencePieceProcessor(model_file=path)
    except Exception as e:
        raise JaxlmError(f"{path}: not a valid SentencePiece model ({e})") from None
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


class InternLM2Tokenizer:
    """HF-compatible InternLM2 tokenizer (``from_pretrained(dir)``)."""

    def __init__(self, model_file: str, config: dict | None = None):
        config = config or {}
        self.sp = _load_sentencepiece(model_file)
        self.model_file = model_file
        self.vocab_size = self.sp.get_piece_size()
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        # id -> string of every special token: the model's own control/unknown
        # pieces, then the config's added_tokens_decoder (which names the chat tokens).
        special: dict[int, str] = {}
        for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()):
            if i >= 0:
                special[i] = self.sp.id_to_piece(i)
        decoder = config.get("added_tokens_decoder")
        if decoder:
            for key, entry in decoder.items():
                content = entry["content"] if isinstance(entry, dict) else str(entry)
                special[int(key)] = content
        else:  # no config: chat tokens trained into the model as user-defined pieces
            for token in CHAT_TOKENS:
                i = self.sp.piece_to_id(token)
                if i != self.sp.unk_id() and self.sp.id_to_piece(i) == token:
                    special[i] = token
        self.special_ids = special
        self.special_tokens = {text: i for i, text in special.items()}
        self.bos_token_id = self._token_id(config.get("bos_token"), self.sp.bos_id())
        self.eos_token_id = self._token_id(config.get("eos_token"), self.sp.eos_id())
        self.unk_token_id = self._token_id(config.get("unk_token"), self.sp.unk_id())
        pad = config.get("pad_token")
        self.pad_token_id = self._token_id(pad, self.eos_token_id) if pad else self.eos_token_id
        pattern = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    def _token_id(self, value, default: int) -> int:
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            return default
        if value in self.special_tokens:
            return self.special_tokens[value]
        return self.sp.piece_to_id(value)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None) -> "InternLM2Tokenizer":
        """A directory or ``tokenizer.model`` file, or a hub id (its snapshot's tokenizer files only)."""
        path = resolve_model_path(path, revision, weights=False)
        model_file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise JaxlmError(f"{path}: no {TOKENIZER_FILE} found (the SentencePiece model of InternLM2)")
        config = {}
        config_file = os.path.join(os.path.dirname(model_file), CONFIG_FILE)
        if os.path.isfile(config_file):
            try:
                with open(config_file, encoding="utf-8") as f:
                    config = json.load(f)
            except ValueError as e:
                raise JaxlmError(f"{config_file}: invalid JSON ({e})") from None
        return cls(model_file, config)

    # ------------------------------------------------------------------ encode
    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp.piece_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise JaxlmError(f"encode: text must be a string, got {type(text).__name__}")
        ids: list[int] = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        chunks = self._split.split(text) if self._split is not None else [text]
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self.special_tokens:
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        if add_special_tokens and self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def __call__(self, texts: str | Sequence[str], padding: bool | str = True, max_length: int | None = None,
                 add_special_tokens: bool = True, return_tensors: str | None = "np") -> dict:
        """Encodes a batch, padded on the left (for generation).

        ``padding``: True/"longest" pads to the longest row, "max_length" to
        ``max_length``, False leaves rows unpadded (lists).
        """
        single = isinstance(texts, str)
        rows = [self.encode(t, add_special_tokens) for t in ([texts] if single else texts)]
        if padding is False or padding == "do_not_pad":
            masks = [[1] * len(r) for r in rows]
            return {"input_ids": rows, "attention_mask": masks}
        if padding in (True, "longest"):
            width = max(len(r) for r in rows)
        elif padding == "max_length":
            if max_length is None:
                raise JaxlmError("padding='max_length' needs max_length")
            width = max_length
            too_long = [len(r) for r in rows if len(r) > width]
            if too_long:
                raise JaxlmError(f"max_length: a row has {too_long[0]} tokens, more than {width}")
        else:
            raise JaxlmError(f"padding: expected True, False, 'longest' or 'max_length', got {padding!r}")
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = r
                mask[i, width - len(r):] = 1
        if return_tensors is None:
            return {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
        return {"input_ids": ids, "attention_mask": mask}

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise JaxlmError(f"decode: id {bad[0]} is out of range for vocab size {self.vocab_size}")
        out, pending, prev_special = "", [], False
        for i in ids:
            if i in self.special_ids:
                if skip_special_tokens:
                    continue
                if not prev_special:
                    out += " "
                out += self.sp.decode(pending) + self.special_ids[i]
                pending, prev_special = [], True
            else:
                pending.append(i)
                prev_special = False
        return out + self.sp.decode(pending)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.special_ids.get(int(i), self.sp.id_to_piece(int(i))) for i in ids]

    # ------------------------------------------------------------ chat format
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        """chatml text (or ids) for OpenAI-style messages, as InternLM2's template.

        Roles: system, user, assistant, environment. A message may carry a tool
        ``name`` ("plugin" or "interpreter"), rendered as
        ``<|im_start|>environment name=<|plugin|>``.
        """
        text = self.special_ids.get(self.bos_token_id, "<s>") + render_messages(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text

"""Training a small InternLM2-style SentencePiece tokenizer (tests, tiny demos).

Same normalization as InternLM2's model (identity, no dummy prefix, spaces
kept), byte fallback, and the chat tokens as user-defined pieces named in a
``tokenizer_config.json``, so `InternLM2Tokenizer` treats it like the real one.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable

from jaxlm.tokenizer import CHAT_TOKENS, CONFIG_FILE, TOKENIZER_FILE


def train_tokenizer(texts: Iterable[str], dst: str, vocab_size: int = 512) -> str:
    import sentencepiece as spm

    os.makedirs(dst, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        user_defined_symbols=list(CHAT_TOKENS), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(os.path.join(dst, TOKENIZER_FILE), "wb") as f:
        f.write(model.getvalue())
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    entry = lambda text: {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
    decoder = {str(i): entry(sp.id_to_piece(i)) for i in (0, 1, 2)}
    decoder.update({str(sp.piece_to_id(t)): entry(t) for t in CHAT_TOKENS})
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "InternLM2Tokenizer", "added_tokens_decoder": decoder,
              "additional_special_tokens": list(CHAT_TOKENS)}
    with open(os.path.join(dst, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return dst

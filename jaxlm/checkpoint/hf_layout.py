"""The HF <-> jaxlm parameter table: names and the reshape/transpose between them.

Each rule says how an HF tensor (PyTorch ``[out, in]`` layout) becomes the
jaxlm parameter: view it as ``split`` and transpose by ``perm``. The inverse
is derived, so a round trip is bit-exact by construction. jaxlm keeps the
``[out, in]`` order (see `jaxlm.nn.linear` for why), so today every ``perm``
is the identity and only the packed dims are unflattened. The table still
carries the transpose for whole-tensor conversion (`to_jaxlm` / `to_hf`); the
sliced reads of sharded loading support only the identity and say so.

jaxlm names are the dotted paths of the unscanned model's parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from jaxlm.config import InternLM2Config

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                                       # "{i}" stands for the layer index
    jaxlm: str
    hf_shape: Callable[[InternLM2Config], Shape]  # shape in the HF file
    split: Callable[[InternLM2Config], Shape]     # the HF tensor viewed as this ...
    perm: Shape                                   # ... then transposed by this
    when: Callable[[InternLM2Config], bool] = lambda c: True

    def jaxlm_shape(self, c: InternLM2Config) -> Shape:
        split = self.split(c)
        return tuple(split[p] for p in self.perm)

    def to_jaxlm(self, array: np.ndarray, c: InternLM2Config) -> np.ndarray:
        return np.ascontiguousarray(array.reshape(self.split(c)).transpose(self.perm))

    def to_hf(self, array: np.ndarray, c: InternLM2Config) -> np.ndarray:
        inverse = tuple(int(i) for i in np.argsort(self.perm))
        return np.ascontiguousarray(array.transpose(inverse).reshape(self.hf_shape(c)))


def _qkv(c):  # rows of wqkv: per kv head, its G query heads, then k, then v
    return (c.num_key_value_heads, c.q_per_kv + 2, c.head_dim)


def _qkv_rows(c):
    return int(np.prod(_qkv(c)))


E = lambda c: c.hidden_size
I = lambda c: c.intermediate_size
V = lambda c: c.vocab_size
H = lambda c: c.num_attention_heads
D = lambda c: c.head_dim
has_bias = lambda c: c.bias
untied = lambda c: not c.tie_word_embeddings
vec = lambda c: (E(c),)

L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    # hf name, jaxlm name, HF shape, split (jaxlm keeps HF's [out, in] order), perm
    Rule("model.tok_embeddings.weight", "model.tok_embeddings.embedding",
         lambda c: (V(c), E(c)), lambda c: (V(c), E(c)), (0, 1)),
    Rule(L + "attention.wqkv.weight", L + "attention.wqkv.kernel",
         lambda c: (_qkv_rows(c), E(c)), lambda c: _qkv(c) + (E(c),), (0, 1, 2, 3)),
    Rule(L + "attention.wqkv.bias", L + "attention.wqkv.bias",
         lambda c: (_qkv_rows(c),), _qkv, (0, 1, 2), when=has_bias),
    Rule(L + "attention.wo.weight", L + "attention.wo.kernel",
         lambda c: (E(c), H(c) * D(c)), lambda c: (E(c), H(c), D(c)), (0, 1, 2)),
    Rule(L + "attention.wo.bias", L + "attention.wo.bias", vec, vec, (0,), when=has_bias),
    Rule(L + "attention_norm.weight", L + "attention_norm.scale", vec, vec, (0,)),
    Rule(L + "feed_forward.w1.weight", L + "feed_forward.w1.kernel",
         lambda c: (I(c), E(c)), lambda c: (I(c), E(c)), (0, 1)),
    Rule(L + "feed_forward.w3.weight", L + "feed_forward.w3.kernel",
         lambda c: (I(c), E(c)), lambda c: (I(c), E(c)), (0, 1)),
    Rule(L + "feed_forward.w2.weight", L + "feed_forward.w2.kernel",
         lambda c: (E(c), I(c)), lambda c: (E(c), I(c)), (0, 1)),
    Rule(L + "ffn_norm.weight", L + "ffn_norm.scale", vec, vec, (0,)),
    Rule("model.norm.weight", "model.norm.scale", vec, vec, (0,)),
    Rule("output.weight", "output.kernel",
         lambda c: (V(c), E(c)), lambda c: (V(c), E(c)), (0, 1), when=untied),
)


# Non-persistent buffers some older checkpoints still contain; never weights.
IGNORED_HF = re.compile(r".*\.rotary_emb\.inv_freq$")
# With tied embeddings HF may or may not store the (duplicate) output weight.
OPTIONAL_WHEN_TIED = "output.weight"


@dataclasses.dataclass(frozen=True)
class Entry:
    rule: Rule
    layer: int | None

    @property
    def hf_name(self) -> str:
        return self.rule.hf.format(i=self.layer)

    @property
    def jaxlm_name(self) -> str:
        return self.rule.jaxlm.format(i=self.layer)


def entries(c: InternLM2Config) -> list[Entry]:
    """Every tensor the config implies, in HF checkpoint order."""
    out = []
    for rule in RULES:
        if not rule.when(c):
            continue
        layers = range(c.num_hidden_layers) if "{i}" in rule.hf else [None]
        out.extend(Entry(rule, i) for i in layers)
    # HF order: embedding, the layers, then the final norm and output head.
    top_first = {"model.tok_embeddings.weight": 0}
    out.sort(key=lambda e: (top_first.get(e.hf_name, 2 if e.layer is None else 1), e.layer or 0))
    return out


def by_hf_name(c: InternLM2Config) -> dict[str, Entry]:
    return {e.hf_name: e for e in entries(c)}


def by_jaxlm_name(c: InternLM2Config) -> dict[str, Entry]:
    return {e.jaxlm_name: e for e in entries(c)}

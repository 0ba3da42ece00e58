"""How InternEvo splits InternLM2 over its ranks and pipeline stages.

Facts read from InternEvo's sources:
- one file per rank: ``model_tp{t}_pp{p}.pt`` (tensor-parallel modes) or
  ``model_wp{w}_pp{p}.pt`` (ISP weight parallelism); layer numbers are local
  to each pipeline stage, and stages take layers by its uniform partition;
- ``wqkv`` rows are grouped per kv head (its q heads, then k, then v), as in HF,
  so shards join along dim 0; newer saves store each rank's ``wqkv`` as row
  slices ``wq``/``wk``/``wv`` of sizes q/n, kv/n, kv/n (not true q/k/v);
- ``wo``/``w2`` split on dim 1 in tensor-parallel files, dim 0 in ISP files;
  the embedding on dim 1 with ``embed_split_hidden``, else dim 0;
- ``qk_interleaved`` (or ``adapt_hf=False``) means each q/k head's rows are in
  rotary pair order (0, 1), (2, 3)...; HF rotates halves (j, j + D/2).
"""

from __future__ import annotations

import os
import re

import numpy as np

from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, JaxlmError

SHARD_FILE = re.compile(r"^model_(tp|wp)(\d+)_pp(\d+)\.pt$")
ANY_SHARD_FILE = re.compile(r"^model_(tp|wp)\d+_pp\d+(_dp\d+)?\.pt$")  # with FSDP's, to refuse those by name
LAYER_PARAMS = ("attention.wqkv.weight", "attention.wo.weight", "attention_norm.weight",
                "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
                "ffn_norm.weight")
SPLIT_QKV = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
EMBEDDING_KEYS = ("tok_embeddings.weight", "tok_embeddings.word_embeddings.weight")
TOP_KEYS = {"norm.weight": "model.norm.weight", "output.weight": "output.weight",
            **{k: "model.tok_embeddings.weight" for k in EMBEDDING_KEYS}}
LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def shard_name(mode: str, rank: int, stage: int) -> str:
    return f"model_{mode}{rank}_pp{stage}.pt"


def discover_shards(path: str) -> tuple[str, int, int]:
    """(mode 'tp' or 'wp', ranks, stages); every shard the names imply must be there."""
    found = {}
    for name in os.listdir(path):
        m = SHARD_FILE.match(name)
        if m:
            found.setdefault(m.group(1), set()).add((int(m.group(2)), int(m.group(3))))
    if not found:
        fsdp = any(ANY_SHARD_FILE.match(name) for name in os.listdir(path))
        raise CheckpointError(f"{path}: " + ("FSDP-sharded InternEvo saves (model_tp*_pp*_dp*.pt) are not supported"
                              if fsdp else "no InternEvo shards (model_tp{t}_pp{p}.pt or model_wp{w}_pp{p}.pt)"))
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds both model_tp* and model_wp* shards; keep one save per directory")
    (mode, pairs), = found.items()
    ranks, stages = max(r for r, _ in pairs) + 1, max(s for _, s in pairs) + 1
    missing = [shard_name(mode, r, s) for s in range(stages) for r in range(ranks) if (r, s) not in pairs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing shard {missing[0]}{more}; the shard names imply "
                              f"{ranks} {mode} ranks x {stages} pipeline stages")
    return mode, ranks, stages


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise CheckpointError(f"{what} ({n}) is not divisible by the {parts} parallel ranks")
    return n // parts


def shard_shapes(c: InternLM2Config, ranks: int, mode: str, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """Each parameter's shape in one rank's file (by Origin suffix)."""
    e, i, v, d = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    div = lambda n, what: _divide(n, ranks, what)
    row_split = mode == "tp"  # wo / w2 are row-parallel (split inputs) in tp files, split outputs in ISP
    return {
        "attention.wqkv.weight": (div(q + 2 * kv, "wqkv rows"), e),
        "attention.wq.weight": (div(q, "wq rows"), e),
        "attention.wk.weight": (div(kv, "wk rows"), e),
        "attention.wv.weight": (div(kv, "wv rows"), e),
        "attention.wo.weight": (e, div(q, "wo columns")) if row_split else (div(e, "wo rows"), q),
        "feed_forward.w1.weight": (div(i, "w1 rows"), e),
        "feed_forward.w3.weight": (div(i, "w3 rows"), e),
        "feed_forward.w2.weight": (e, div(i, "w2 columns")) if row_split else (div(e, "w2 rows"), i),
        "attention_norm.weight": (e,), "ffn_norm.weight": (e,), "norm.weight": (e,),
        "output.weight": (div(v, "output rows"), e),
        "embedding": (v, div(e, "embedding columns")) if embed_dim == 1 else (div(v, "embedding rows"), e),
    }


def split_dims(mode: str, embed_dim: int) -> dict[str, int | None]:
    """The dim each parameter (by Origin suffix) is split on; None: replicated."""
    row = 1 if mode == "tp" else 0
    return {"attention.wqkv.weight": 0, "attention.wo.weight": row, "feed_forward.w1.weight": 0,
            "feed_forward.w3.weight": 0, "feed_forward.w2.weight": row, "output.weight": 0,
            "embedding": embed_dim, "attention_norm.weight": None, "ffn_norm.weight": None,
            "norm.weight": None}


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """InternEvo's uniform partition: L // P layers per stage, the L % P extra ones on the last stages."""
    if num_layers < stages:
        raise JaxlmError(f"--pp {stages}: {num_layers} layers cannot fill {stages} pipeline stages")
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for stage in range(stages):
        size = base + (stage >= stages - extra)
        out.append(range(start, start + size))
        start += size
    return out


# ------------------------------------------------------------------ rotary order
def rotary_rows(head_dim: int) -> np.ndarray:
    """Row order taking an interleaved (pairwise) q/k head to HF's half rotation."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def permute_qk(wqkv: np.ndarray, c: InternLM2Config, rows: np.ndarray) -> np.ndarray:
    grouped = wqkv.reshape(c.num_key_value_heads, c.q_per_kv + 2, c.head_dim, -1).copy()
    grouped[:, :-1] = grouped[:, :-1, rows]  # every q head and the k head; v keeps its order
    return grouped.reshape(wqkv.shape)

"""An independent PyTorch InternLM2, written from the original modeling code's math.

It keeps the original module names (``attention.wqkv``, ``feed_forward.w1``,
``attention_norm`` ...) so ``load_state_dict(strict=True)`` on an exported
checkpoint proves the names and layouts are the original's. It is the oracle
for settings the shared golden files do not cover (MHA, MQA, linear scaling,
biases, tied embeddings).
"""

from __future__ import annotations

import glob
import json
import math
import os

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(cfg, head_dim, position_ids, dtype):
    base = cfg["rope_theta"]
    scaling = cfg.get("rope_scaling")
    pos = position_ids.float()
    if scaling and scaling["type"] == "dynamic":
        seq_len = torch.max(position_ids) + 1
        if seq_len > cfg["max_position_embeddings"]:
            f = scaling["factor"]
            base = base * ((f * seq_len / cfg["max_position_embeddings"]) - (f - 1)) ** (head_dim / (head_dim - 2))
    if scaling and scaling["type"] == "linear":
        pos = pos / scaling["factor"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = pos[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg["num_attention_heads"]
        self.kv = cfg.get("num_key_value_heads") or self.heads
        self.groups = self.heads // self.kv
        self.head_dim = cfg["hidden_size"] // self.heads
        bias = cfg.get("bias", True)
        self.wqkv = nn.Linear(cfg["hidden_size"], (self.heads + 2 * self.kv) * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg["hidden_size"], bias=bias)

    def forward(self, x, position_ids, mask):
        b, q, _ = x.shape
        qkv = self.wqkv(x).view(b, q, self.kv, 2 + self.groups, self.head_dim)
        query = qkv[..., : self.groups, :].reshape(b, q, self.heads, self.head_dim).transpose(1, 2)
        key = qkv[..., -2, :].transpose(1, 2)
        value = qkv[..., -1, :].transpose(1, 2)
        cos, sin = rotary(self.cfg, self.head_dim, position_ids, x.dtype)
        cos, sin = cos[:, None], sin[:, None]
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        key = key.repeat_interleave(self.groups, dim=1)
        value = value.repeat_interleave(self.groups, dim=1)
        w = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(w, value).transpose(1, 2).reshape(b, q, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        e, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.w1 = nn.Linear(e, i, bias=False)
        self.w3 = nn.Linear(e, i, bias=False)
        self.w2 = nn.Linear(i, e, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.ffn_norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, x, position_ids, mask):
        x = x + self.attention(self.attention_norm(x), position_ids, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Backbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class ReferenceInternLM2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.tied = cfg.get("tie_word_embeddings", False)
        if not self.tied:
            self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        x = self.model.tok_embeddings(input_ids)
        minval = torch.finfo(x.dtype).min
        mask = torch.full((t, t), minval).triu(1)[None, None].repeat(b, 1, 1, 1)
        mask = mask.masked_fill(attention_mask[:, None, None, :] == 0, minval)
        for layer in self.model.layers:
            x = layer(x, position_ids, mask)
        x = self.model.norm(x)
        w = self.model.tok_embeddings.weight if self.tied else self.output.weight
        return (x @ w.T).float()


def load_reference(hf_dir: str) -> ReferenceInternLM2:
    """Builds the reference from an HF directory with strict name checking."""
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    state = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        state.update(load_file(path))
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.bin"))):
        state.update(torch.load(path, weights_only=True))
    state = {k: v.float() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    model = ReferenceInternLM2(cfg)
    if model.tied:
        state.pop("output.weight", None)
    model.load_state_dict(state, strict=True)
    return model.eval()

"""Shared helpers of the CPU benchmarks: the ~217M InternLM2-shaped model and its Llama twin."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

# The generation benchmark's model: InternLM2-shaped, ~217M parameters.
BENCH_SHAPE = dict(vocab_size=92544, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=4096,
                   rope_theta=1_000_000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=False)


def bench_config(**overrides):
    from jaxlm import InternLM2Config

    return InternLM2Config(**{**BENCH_SHAPE, **overrides},
                           extra={"architectures": ["InternLM2ForCausalLM"]})


def make_checkpoint(dst: str, config, seed: int = 0) -> str:
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint

    if not os.path.isfile(os.path.join(dst, "config.json")):
        write_hf_checkpoint(dst, config, seed=seed, dtype="float32")
    return dst


def llama_twin(hf_dir: str, config):
    """The same weights as a transformers LlamaForCausalLM (wqkv split per kv group)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxlm.checkpoint.hf_reader import HFCheckpoint

    K, G, D, E = config.num_key_value_heads, config.q_per_kv, config.head_dim, config.hidden_size
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=E, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=K, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, attention_bias=False,
        tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
        torch_dtype="float32", attn_implementation="sdpa"))
    reader = HFCheckpoint(hf_dir, config)
    t = lambda name: torch.from_numpy(np.ascontiguousarray(reader.read(name)))
    state = {"model.embed_tokens.weight": t("model.tok_embeddings.weight"),
             "model.norm.weight": t("model.norm.weight"), "lm_head.weight": t("output.weight")}
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = t(p + "attention.wqkv.weight").view(K, G + 2, D, E)
        state[q + "self_attn.q_proj.weight"] = wqkv[:, :G].reshape(K * G * D, E)
        state[q + "self_attn.k_proj.weight"] = wqkv[:, G].reshape(K * D, E)
        state[q + "self_attn.v_proj.weight"] = wqkv[:, G + 1].reshape(K * D, E)
        state[q + "self_attn.o_proj.weight"] = t(p + "attention.wo.weight")
        state[q + "mlp.gate_proj.weight"] = t(p + "feed_forward.w1.weight")
        state[q + "mlp.up_proj.weight"] = t(p + "feed_forward.w3.weight")
        state[q + "mlp.down_proj.weight"] = t(p + "feed_forward.w2.weight")
        state[q + "input_layernorm.weight"] = t(p + "attention_norm.weight")
        state[q + "post_attention_layernorm.weight"] = t(p + "ffn_norm.weight")
    llama.load_state_dict(state, strict=True)
    llama.generation_config.eos_token_id = None
    llama.generation_config.pad_token_id = 0
    return llama.eval()


def best_of(fn, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second read by a large memcpy (numpy copy)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return nbytes / best_of(lambda: np.copyto(dst, src), 5)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"

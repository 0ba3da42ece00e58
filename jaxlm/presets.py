"""Shapes of the released InternLM2 / InternLM2.5 models."""

from jaxlm.config import InternLM2Config


def _preset(hidden, layers, heads, kv_heads, intermediate, rope_scaling):
    return InternLM2Config(
        vocab_size=92544, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, rope_scaling=rope_scaling,
        rope_theta=1_000_000.0, rms_norm_eps=1e-5, bias=False,
        tie_word_embeddings=False, max_position_embeddings=32768,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )


def _dyn(factor):
    return {"type": "dynamic", "factor": factor}


PRESETS: dict[str, InternLM2Config] = {
    "internlm2-1_8b": _preset(2048, 24, 16, 8, 8192, _dyn(2.0)),
    "internlm2-7b": _preset(4096, 32, 32, 8, 14336, None),
    "internlm2-chat-7b": _preset(4096, 32, 32, 8, 14336, _dyn(2.0)),
    "internlm2-20b": _preset(6144, 48, 48, 8, 16384, None),
    "internlm2-chat-20b": _preset(6144, 48, 48, 8, 16384, _dyn(3.0)),
    "internlm2_5-7b-chat": _preset(4096, 32, 32, 8, 14336, _dyn(2.0)),
}

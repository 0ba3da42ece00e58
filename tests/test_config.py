import json

import pytest

from jaxlm import PRESETS, ConfigError, InternLM2Config


def test_reads_golden_config(golden):
    cfg = InternLM2Config.from_pretrained(str(golden("tiny_dynamic_ntk")))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 8, 2)
    assert cfg.head_dim == 16 and cfg.q_per_kv == 4
    assert cfg.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert cfg.extra["auto_map"]["AutoConfig"].startswith("configuration_internlm2")


def test_missing_fields_take_the_original_defaults():
    cfg = InternLM2Config.from_dict({"model_type": "internlm2", "hidden_size": 64,
                                     "num_attention_heads": 4, "num_hidden_layers": 1})
    assert cfg.bias is True  # the original's default
    assert cfg.num_key_value_heads == 4  # None means equal to heads
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000


def test_round_trips_through_dict():
    cfg = PRESETS["internlm2-chat-7b"].replace(extra={"torch_dtype": "bfloat16", "auto_map": {"a": "b"}})
    again = InternLM2Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
    ({"hidden_size": 66}, "divisible by num_attention_heads"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor must be a number >= 1"),
    ({"rope_scaling": {"type": "linear"}}, "rope_scaling must be"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
])
def test_validation_errors_name_the_problem(change, message):
    data = {"model_type": "internlm2", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 10}
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        InternLM2Config.from_dict(data, source="x/config.json")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        InternLM2Config.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name, billions", [
    ("internlm2-1_8b", 1.89), ("internlm2-7b", 7.74), ("internlm2-chat-7b", 7.74),
    ("internlm2-20b", 19.86), ("internlm2-chat-20b", 19.86), ("internlm2_5-7b-chat", 7.74),
])
def test_presets_have_released_sizes(name, billions):
    cfg = PRESETS[name]
    assert cfg.vocab_size == 92544 and cfg.max_position_embeddings == 32768
    assert cfg.num_key_value_heads == 8 and not cfg.bias and not cfg.tie_word_embeddings
    assert abs(cfg.num_params() / 1e9 - billions) < 0.01


def test_preset_rope_scaling():
    assert PRESETS["internlm2-7b"].rope_scaling is None
    assert PRESETS["internlm2-chat-20b"].rope_scaling == {"type": "dynamic", "factor": 3.0}
    assert InternLM2Config.from_pretrained("internlm2-1_8b").rope_factor == 2.0

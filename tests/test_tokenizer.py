"""The tokenizer against the original's ids and texts, and on a tokenizer trained here."""

import json

import numpy as np
import pytest

from jaxlm import JaxlmError
from jaxlm.chat import build_prompt, format_tool_call, parse_tool_call, tool_result_message
from jaxlm.tokenizer import InternLM2Tokenizer
from jaxlm.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def real_tokenizer():
    from conftest import require_shared

    return InternLM2Tokenizer.from_pretrained(str(require_shared("tokenizers", "internlm2")))


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    texts = [f"The quick brown fox {i} jumps over the lazy dog. 书生浦语 said hello {i * 7}." for i in range(300)]
    return InternLM2Tokenizer.from_pretrained(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 400))


def test_golden_tokenizer_cases(real_tokenizer, golden):
    cases = json.loads((golden("tokenizer_cases.json")).read_text())["cases"]
    assert cases
    for case in cases:
        ids = real_tokenizer.encode(case["text"])
        assert ids == case["ids_with_bos"], case["text"]
        assert real_tokenizer.decode(ids, skip_special_tokens=True) == case["decode_skip_special"]


def test_real_tokenizer_special_tokens(real_tokenizer):
    tok = real_tokenizer
    assert tok.vocab_size == 92544 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    names = {"<|im_start|>": 92543, "<|im_end|>": 92542, "<|action_start|>": 92541,
             "<|action_end|>": 92540, "<|interpreter|>": 92539, "<|plugin|>": 92538}
    for text, i in names.items():
        assert tok.token_to_id(text) == i and tok.encode(text, add_special_tokens=False) == [i]
    assert tok.encode("a </s>", add_special_tokens=False)[-2:] == [262, 2]  # the space is its own piece


def test_golden_chat_prompt_and_decoding(real_tokenizer, golden):
    case = json.loads((golden("tiny_chat_realvocab") / "chat_case.json").read_text())
    ref = np.load(golden("tiny_chat_realvocab") / "golden.npz")
    prompt = build_prompt(case["query"], case["history"], case["meta_instruction"])
    assert real_tokenizer.encode(prompt) == ref["prompt_ids"][0].tolist()
    assert real_tokenizer.decode(ref["prompt_ids"][0]) == case["prompt_text"]
    new = ref["greedy_ids"][0, ref["prompt_ids"].shape[1]:]
    assert real_tokenizer.decode(new, skip_special_tokens=True) == case["generated_text_skip_special"]
    messages = [{"role": "system", "content": case["meta_instruction"]}]
    for q, a in case["history"]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": case["query"]})
    assert real_tokenizer.apply_chat_template(messages, tokenize=True) == ref["prompt_ids"][0].tolist()


def test_trained_tokenizer_follows_the_original_rules(tiny_tokenizer):
    tok = tiny_tokenizer
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert start != tok.unk_token_id and end != tok.unk_token_id
    sp = tok.sp
    text = "The fox <|im_start|>user\nhello</s>"
    expected = [1] + sp.encode("The fox ") + [start] + sp.encode("user\nhello") + [2]
    assert tok.encode(text) == expected
    assert sp.encode("The fox ")[-1] == sp.piece_to_id("▁")  # the space before a special token
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "The fox user\nhello"
    # the original inserts a space before a special token that follows text
    assert tok.decode(tok.encode(text)) == " <s> The fox <|im_start|> user\nhello</s>"
    assert tok.encode("", add_special_tokens=True) == [1]
    assert tok.encode("hi", add_special_tokens=False) == sp.encode("hi")


def test_batch_call_pads_left(tiny_tokenizer):
    batch = tiny_tokenizer(["The quick brown fox", "hi"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    n = len(tiny_tokenizer.encode("hi"))
    assert mask[1].tolist() == [0] * (ids.shape[1] - n) + [1] * n
    assert ids[1, -n:].tolist() == tiny_tokenizer.encode("hi")
    assert (ids[1, : ids.shape[1] - n] == tiny_tokenizer.pad_token_id).all()
    fixed = tiny_tokenizer(["hi"], padding="max_length", max_length=10)
    assert fixed["input_ids"].shape == (1, 10)
    with pytest.raises(JaxlmError, match="max_length"):
        tiny_tokenizer(["The quick brown fox"], padding="max_length", max_length=2)


def test_chat_template_roles_and_tools(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "You can search."},
        {"role": "user", "content": "find jax"},
        {"role": "assistant", "content": format_tool_call("search", {"q": "jax"})},
        tool_result_message({"hits": 3}),
    ]
    text = tiny_tokenizer.apply_chat_template(messages)
    assert text.startswith("<s><|im_start|>system\nYou can search.<|im_end|>\n<|im_start|>user\nfind jax")
    assert '<|im_start|>environment name=<|plugin|>\n{"hits": 3}<|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids[0] == 1 and ids.count(tiny_tokenizer.token_to_id("<|im_start|>")) == 5
    assert not tiny_tokenizer.apply_chat_template(messages[:2], add_generation_prompt=False).endswith(
        "assistant\n")
    with pytest.raises(JaxlmError, match="role 'robot'"):
        tiny_tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_tool_call_parsing_survives_decoding(tiny_tokenizer):
    text = "I will search." + format_tool_call("search", {"q": "jax", "n": 2})
    decoded = tiny_tokenizer.decode(tiny_tokenizer.encode(text, add_special_tokens=False))
    call = parse_tool_call(decoded)
    assert call.kind == "plugin" and call.name == "search" and call.parameters == {"q": "jax", "n": 2}
    assert call.thought == "I will search."
    code = parse_tool_call("<|action_start|><|interpreter|>\n```python\nprint(1)\n```<|action_end|>")
    assert code.kind == "interpreter" and code.parameters == {"code": "print(1)"}
    assert parse_tool_call("no call here") is None
    with pytest.raises(JaxlmError, match="invalid JSON"):
        parse_tool_call("<|action_start|><|plugin|>\n{oops<|action_end|>")


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(JaxlmError, match="no tokenizer.model"):
        InternLM2Tokenizer.from_pretrained(str(tmp_path))


def test_decode_rejects_out_of_range_ids(tiny_tokenizer):
    with pytest.raises(JaxlmError, match="out of range"):
        tiny_tokenizer.decode([1, 10_000])

"""generate / stream_generate / chat: golden parity, cache correctness, sampling, bad input."""

import json

import numpy as np
import pytest

from jaxlm import InternLM2ForCausalLM, JaxlmError
from jaxlm.runtime import engine
from jaxlm.runtime.sampling import top_k_filter, top_p_filter
from jaxlm.runtime.generate import chat_inputs
from jaxlm.tokenizer import InternLM2Tokenizer


@pytest.fixture(scope="module")
def chat_case(golden):
    path = golden("tiny_chat_realvocab")
    model = InternLM2ForCausalLM.from_pretrained(str(path), dtype="float32", param_dtype="float32")
    tok = InternLM2Tokenizer.from_pretrained(str(path))
    return model, tok, np.load(path / "golden.npz"), json.loads((path / "chat_case.json").read_text())


@pytest.fixture(scope="module")
def tiny(make_hf_checkpoint):
    return InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint())


def test_golden_greedy_ids_and_step_logits(chat_case):
    model, _, ref, _ = chat_case
    out = model.generate(ref["prompt_ids"], max_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    np.testing.assert_array_equal(out["sequences"], ref["greedy_ids"])
    assert np.abs(out["logits"][0] - ref["step_logits"]).max() <= 1e-4
    streamed = [int(t[0]) for t in model.stream_generate(ref["prompt_ids"], max_new_tokens=12)]
    assert streamed == ref["greedy_ids"][0, ref["prompt_ids"].shape[1]:].tolist()


def test_golden_generation_with_pallas_kernels(golden):
    """Prefill through flash_attention, decode through decode_attention (interpret mode)."""
    path = golden("tiny_chat_realvocab")
    ref = np.load(path / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(str(path), dtype="float32", param_dtype="float32",
                                                 attention_impl="pallas")
    out = model.generate(ref["prompt_ids"], max_new_tokens=12, return_dict_in_generate=True,
                         output_logits=True)
    np.testing.assert_array_equal(out["sequences"], ref["greedy_ids"])
    assert np.abs(out["logits"][0] - ref["step_logits"]).max() <= 1e-4


def test_golden_chat_and_stream_chat(chat_case):
    model, tok, ref, case = chat_case
    ids, eos = chat_inputs(tok, case["query"], case["history"], case["meta_instruction"])
    np.testing.assert_array_equal(ids, ref["prompt_ids"])
    assert eos == [2, 92542]
    history = [tuple(h) for h in case["history"]]
    response, new_history = model.chat(tok, case["query"], history, do_sample=False, max_new_tokens=12)
    assert response == case["generated_text_skip_special"]
    assert new_history == history + [(case["query"], response)]
    assert history == [tuple(h) for h in case["history"]]  # not mutated
    partial = list(model.stream_chat(tok, case["query"], history, do_sample=False, max_new_tokens=12))
    assert partial[-1] == (response, new_history)
    assert all(response.startswith(r) for r, _ in partial) and len(partial) > 3


@pytest.mark.parametrize("rope", [None, {"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 3.0}],
                         ids=["plain", "dynamic", "linear"])
def test_cached_decoding_equals_full_recomputation(make_hf_checkpoint, rng, rope):
    # max_position_embeddings 16 < prompt + new: dynamic NTK scales, fixed once for the call
    model = InternLM2ForCausalLM.from_pretrained(
        make_hf_checkpoint(rope_scaling=rope, max_position_embeddings=16))
    prompt = rng.integers(3, 256, (2, 9))
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True)
    seq = out["sequences"]
    assert seq.shape == (2, 19)
    full = np.asarray(model(seq))
    np.testing.assert_allclose(out["logits"], full[:, 8:18], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(seq[:, 9:], full[:, 8:18].argmax(-1))


def test_scanned_model_generates_the_same(make_hf_checkpoint, tiny):
    scanned = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), scan_layers=True)
    prompt = np.arange(3, 14)[None]
    np.testing.assert_array_equal(scanned.generate(prompt, max_new_tokens=6, eos_token_id=None),
                                  tiny.generate(prompt, max_new_tokens=6, eos_token_id=None))


def test_left_padded_batch_gives_each_rows_result(tiny, rng):
    rows = [rng.integers(3, 256, n) for n in (11, 4, 8)]
    width = 11
    ids = np.full((3, width), 2)
    mask = np.zeros((3, width), int)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = tiny.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None)
    np.testing.assert_array_equal(batch[:, :width], ids)
    for i, r in enumerate(rows):
        alone = tiny.generate(r[None], max_new_tokens=7, eos_token_id=None)
        np.testing.assert_array_equal(batch[i, width:], alone[0, len(r):])


def test_stopping_padding_and_early_exit(tiny):
    prompt = np.stack([np.arange(3, 13), np.arange(40, 50)])
    free = tiny.generate(prompt, max_new_tokens=8, eos_token_id=None)
    stop = int(free[0, 12])  # row 0's third new token
    out = tiny.generate(prompt, max_new_tokens=8, eos_token_id=[stop, 10_000 % 256], pad_token_id=0)
    first = list(free[0, 10:]).index(stop)
    assert out[0, 10 + first] == stop and (out[0, 11 + first:] == 0).all()
    if stop not in free[1, 10:]:
        np.testing.assert_array_equal(out[1, 10:], free[1, 10:])
    # every row stops at once -> the loop exits after one token
    both = tiny.generate(prompt, max_new_tokens=8, eos_token_id=[int(free[0, 10]), int(free[1, 10])])
    assert both.shape == (2, 11)


def test_sampling_is_seeded_and_sane(tiny):
    prompt = np.arange(3, 15)[None]
    greedy = tiny.generate(prompt, max_new_tokens=8, eos_token_id=None)
    sample = lambda **kw: tiny.generate(prompt, max_new_tokens=8, eos_token_id=None, do_sample=True, **kw)
    np.testing.assert_array_equal(sample(seed=3), sample(seed=3))
    assert any((sample(seed=s) != sample(seed=3)).any() for s in range(4, 8))
    np.testing.assert_array_equal(sample(top_k=1, seed=5), greedy)
    np.testing.assert_array_equal(sample(temperature=1e-3, seed=6), greedy)
    np.testing.assert_array_equal(sample(top_p=1e-6, seed=7), greedy)


def test_sampled_frequencies_follow_the_softmax(tiny):
    prompt = np.tile(np.arange(3, 15), (512, 1))
    logits = np.asarray(tiny(prompt[:1]))[0, -1]
    for temperature in (1.0, 0.5):
        probs = np.exp((logits - logits.max()) / temperature)
        probs /= probs.sum()
        first = tiny.generate(prompt, max_new_tokens=1, do_sample=True, temperature=temperature,
                              eos_token_id=None, seed=11)[:, -1]
        top = probs.argmax()
        freq = (first == top).mean()
        sigma = np.sqrt(probs[top] * (1 - probs[top]) / len(first))
        assert abs(freq - probs[top]) < 5 * sigma + 1e-3
    # top_k = 3 keeps only the 3 most likely tokens
    first = tiny.generate(prompt, max_new_tokens=1, do_sample=True, top_k=3, eos_token_id=None)[:, -1]
    assert set(first) <= set(np.argsort(logits)[-3:])


def test_repetition_penalty_matches_hf_rule(tiny):
    prompt = np.arange(3, 15)[None]
    logits = np.asarray(tiny(prompt))[0, -1]
    penalized = logits.copy()
    seen = np.unique(prompt)
    penalized[seen] = np.where(logits[seen] < 0, logits[seen] * 5.0, logits[seen] / 5.0)
    out = tiny.generate(prompt, max_new_tokens=1, repetition_penalty=5.0, eos_token_id=None)
    assert out[0, -1] == penalized.argmax()


def test_streamer_protocol(tiny):
    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(np.asarray(value))

        def end(self):
            self.calls.append("end")

    rec = Recorder()
    prompt = np.arange(3, 10)[None]
    out = tiny.generate(prompt, max_new_tokens=4, eos_token_id=None, streamer=rec)
    np.testing.assert_array_equal(rec.calls[0], prompt)
    assert [int(c[0]) for c in rec.calls[1:-1]] == out[0, 7:].tolist() and rec.calls[-1] == "end"


def test_buckets_avoid_recompiling_every_turn(tiny, rng):
    before = dict(engine.COMPILES)
    for n in (20, 23, 27, 31):  # one prompt bucket (32), one new-token bucket
        tiny.generate(rng.integers(3, 256, (1, n)), max_new_tokens=5, eos_token_id=None)
    new = {k: engine.COMPILES[k] - before.get(k, 0) for k in engine.COMPILES}
    print("compilations over 4 turns:", new)
    assert new.get("prefill", 0) <= 1 and new.get("decode_loop", 0) <= 1


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
    (dict(input_ids=np.array([[1, 2, 256]])), "input_ids"),
    (dict(input_ids=np.array([[1, -1]])), "input_ids"),
    (dict(attention_mask=np.ones((1, 3))), "attention_mask"),
])
def test_bad_generate_arguments(tiny, kwargs, name):
    before = dict(engine.COMPILES)
    args = dict(input_ids=np.array([[1, 2, 3, 4]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        tiny.generate(**args)
    assert dict(engine.COMPILES) == before  # refused before anything compiled


def test_bad_chat_arguments(chat_case):
    model, tok, _, _ = chat_case
    for query in ("", "   "):
        with pytest.raises(JaxlmError, match="query"):
            model.chat(tok, query)
    with pytest.raises(ValueError, match="top_p"):
        model.chat(tok, "hello", top_p=2.0)


def _hf_top_p(logits, p):
    """HF's TopPLogitsWarper, in numpy: sort ascending, drop the tail with cumulative mass <= 1 - p."""
    out = logits.copy()
    for b, row in enumerate(logits):
        order = np.argsort(row, kind="stable")
        e = np.exp(row[order] - row.max())
        drop = np.cumsum(e / e.sum()) <= 1 - p[b]
        drop[-1] = False
        out[b, order[drop]] = -np.inf
    return out


def _hf_top_k(logits, k):
    out = logits.copy()
    for b, row in enumerate(logits):
        out[b, row < np.sort(row)[::-1][k[b] - 1]] = -np.inf
    return out


@pytest.mark.parametrize("vocab,scale", [(92544, 3.0), (512, 10.0), (64, 0.01)])
def test_top_k_and_top_p_keep_what_hf_keeps(rng, vocab, scale):
    logits = (rng.normal(size=(6, vocab)) * scale).astype(np.float32)
    logits[1, : vocab // 2] = -np.inf                     # already filtered (top-k before top-p)
    logits[2, :8] = logits[2].max()                       # ties at the top
    p = np.asarray([0.8, 0.5, 0.95, 0.01, 1.0, 0.3], np.float32)
    k = np.asarray([1, 5, 50, vocab, 3, 2])
    got_p = np.asarray(top_p_filter(logits, p[:, None]))
    got_k = np.asarray(top_k_filter(logits, k))
    np.testing.assert_array_equal(np.isinf(got_p), np.isinf(_hf_top_p(logits, p)))
    np.testing.assert_array_equal(np.isinf(got_k), np.isinf(_hf_top_k(logits, k)))
    kept = ~np.isinf(got_p)
    np.testing.assert_array_equal(got_p[kept], logits[kept])  # kept logits unchanged

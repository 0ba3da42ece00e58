"""The serving engine: greedy parity with generate, continuous batching, pages, prefix cache, stops."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
from jaxlm.assets import TINY_DIR
from jaxlm.errors import JaxlmError
from jaxlm.serving import engine as engine_lib
from jaxlm.serving.engine import Engine, EngineConfig
from jaxlm.serving.params import RequestError, SamplingParams
from jaxlm.sharding import make_mesh

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONFIG = EngineConfig(max_num_seqs=4, max_model_len=128, page_size=8, num_pages=96, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def model(make_hf_checkpoint):
    return InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint())


@pytest.fixture(scope="module")
def tokenizer():
    return InternLM2Tokenizer.from_pretrained(TINY_DIR)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    eng = Engine(model, tokenizer, CONFIG)
    eng.warmup()
    return eng


def run(eng, requests, max_steps=400):
    """Adds ``(prompt, params)`` pairs, steps until all finish; returns each one's outputs merged."""
    ids = [eng.add_request(p, params) for p, params in requests]
    merged = {i: {"tokens": [], "text": "", "finish": None, "logprobs": []} for i in ids}
    for _ in range(max_steps):
        if not eng.has_work():
            break
        for out in eng.step():
            m = merged[out.request_id]
            m["tokens"] += out.token_ids
            m["text"] += out.text
            m["logprobs"] += out.logprobs or []
            m["finish"] = out.finish_reason if out.finished else None
    assert not eng.has_work(), "requests still running after the step limit"
    return [merged[i] for i in ids]


def generate_alone(model, prompt, n):
    return model.generate(np.asarray([prompt]), max_new_tokens=n, eos_token_id=None)[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def prompts(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in (5, 23, 47, 90)]   # 90 > the token budget: 2+ chunks


def test_greedy_equals_generate_alone_and_batched(engine, model, prompts):
    want = [generate_alone(model, p, 10) for p in prompts]
    alone = [run(engine, [(p, SamplingParams(max_tokens=10, **GREEDY))])[0]["tokens"] for p in prompts]
    batched = [r["tokens"] for r in run(engine, [(p, SamplingParams(max_tokens=10, **GREEDY)) for p in prompts])]
    assert alone == want and batched == want


def test_nothing_compiles_after_warmup(engine, prompts):
    before = engine_lib.compile_count()
    mixed = [
        (prompts[0], SamplingParams(max_tokens=7, **GREEDY)),
        (prompts[1], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=1)),
        (prompts[2], SamplingParams(max_tokens=5, temperature=1.2, top_k=20, repetition_penalty=1.3, logprobs=3)),
        (prompts[3], SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=(17,))),
        (prompts[0] * 3, SamplingParams(max_tokens=3, **GREEDY)),
        (prompts[2][:9], SamplingParams(max_tokens=30, temperature=0.7, seed=5)),
    ]
    results = run(engine, mixed)
    assert all(r["finish"] in ("length", "stop") for r in results)
    assert engine_lib.compile_count() == before


def test_preemption_recomputes_and_changes_nothing(model, tokenizer, prompts):
    """A pool too small for all four: the newest is preempted, recomputed, and still equals generate."""
    tight = Engine(model, tokenizer, EngineConfig(max_num_seqs=4, max_model_len=128, page_size=8, num_pages=22,
                                                  max_num_batched_tokens=48))
    want = [generate_alone(model, p, 24) for p in prompts]
    got = run(tight, [(p, SamplingParams(max_tokens=24, **GREEDY)) for p in prompts])
    assert [r["tokens"] for r in got] == want
    assert tight.preemptions > 0
    assert all(r == 0 for r in tight.pool.refs)      # every page released


@pytest.mark.parametrize("enabled", [True, False])
def test_prefix_cache_reuses_pages_and_changes_nothing(engine, model, tokenizer, prompts, enabled):
    # Same shapes as the shared engine: the second engine compiles nothing new.
    eng = engine if enabled else Engine(model, tokenizer, dataclasses.replace(CONFIG, enable_prefix_caching=False))
    system = prompts[3][:64]                     # a shared "system prompt" of 8 full pages
    first, second = system + [7, 8, 9], system + [11, 12]
    hits, lookups = eng.pool.hits, eng.pool.lookups
    a = run(eng, [(first, SamplingParams(max_tokens=6, **GREEDY))])[0]["tokens"]
    b = run(eng, [(second, SamplingParams(max_tokens=6, **GREEDY))])[0]["tokens"]
    if enabled:
        assert eng.pool.hits - hits >= 8
    else:
        assert (eng.pool.hits, eng.pool.lookups) == (hits, lookups)
    assert a == generate_alone(model, first, 6) and b == generate_alone(model, second, 6)


def test_seeded_sampling_is_reproducible(engine, prompts):
    params = lambda seed: SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
    a, b, c = run(engine, [(prompts[1], params(3)), (prompts[1], params(3)), (prompts[1], params(4))])
    assert a["tokens"] == b["tokens"] != c["tokens"]


def test_stops_and_finish_reasons(engine, tokenizer, prompts):
    base = run(engine, [(prompts[2], SamplingParams(max_tokens=12, **GREEDY))])[0]
    assert base["finish"] == "length" and len(base["tokens"]) == 12
    stop_id = base["tokens"][4]
    by_id = run(engine, [(prompts[2], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,)))])[0]
    first = base["tokens"].index(stop_id)
    assert by_id["finish"] == "stop" and by_id["tokens"] == base["tokens"][:first + 1]
    text = base["text"]     # random weights: mostly stray bytes (U+FFFD), some printable characters
    stop = next(c for c in text[1:] if c.strip() and c != "\ufffd")
    by_text = run(engine, [(prompts[2], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                       stop=(stop,)))])[0]
    assert by_text["finish"] == "stop" and by_text["text"] == text[:text.index(stop)]


def test_logprobs_are_log_probabilities(engine, prompts):
    r = run(engine, [(prompts[0], SamplingParams(max_tokens=4, logprobs=5, **GREEDY))])[0]
    assert len(r["logprobs"]) == 4
    for step, token in zip(r["logprobs"], r["tokens"]):
        assert step.token_id == token and step.top[0][0] == token          # greedy: the best one
        assert step.logprob <= 0 and abs(step.logprob - step.top[0][1]) < 1e-5
        assert len(step.top) == 5 and [v for _, v in step.top] == sorted((v for _, v in step.top), reverse=True)


def test_abort_frees_pages_at_once(engine, prompts):
    rid = engine.add_request(prompts[3], SamplingParams(max_tokens=30, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.pool.used() > 0
    engine.abort(rid)
    assert not engine.has_work() and all(r == 0 for r in engine.pool.refs)


@pytest.mark.parametrize("kwargs, param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(logprobs=6), "logprobs"), (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(RequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_requests_beyond_the_model_length_are_refused(engine):
    with pytest.raises(RequestError, match="max_model_len"):
        engine.add_request([5] * 100, SamplingParams(max_tokens=29))
    rid = engine.add_request([5] * 100, SamplingParams(max_tokens=28, **GREEDY))   # exactly at the limit
    engine.abort(rid)
    with pytest.raises(RequestError, match="out of range"):
        engine.add_request([5, 999999], SamplingParams())
    with pytest.raises(RequestError, match="at least one token"):
        engine.add_request([], SamplingParams())


SMALL = EngineConfig(max_num_seqs=4, max_model_len=64, page_size=16, num_pages=24, max_num_batched_tokens=48)


def test_on_a_mesh_the_pool_splits_kv_heads_and_greedy_equals_generate(make_hf_checkpoint, model, tokenizer,
                                                                        prompts):
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    # scanned layers: one stacked [L, ...] pool (the default model here is unrolled: a list)
    sharded = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), mesh=mesh, scan_layers=True)
    eng = Engine(sharded, tokenizer, SMALL)
    k_pages = jax.tree.leaves(eng.kv)[0]                      # [L, P, page, K, D]
    shard = k_pages.sharding.shard_shape(k_pages.shape)
    assert shard[-2] == k_pages.shape[-2] // 2 and shard[:-2] == k_pages.shape[:-2]   # kv heads over tensor
    eng.warmup()
    before = engine_lib.compile_count()
    short = [p[:40] for p in prompts]
    got = run(eng, [(p, SamplingParams(max_tokens=8, **GREEDY)) for p in short] +
              [(short[1], SamplingParams(max_tokens=6, temperature=0.8, top_k=5, seed=3))])
    assert engine_lib.compile_count() == before
    assert [r["tokens"] for r in got[:len(short)]] == [generate_alone(model, p, 8) for p in short]


def test_a_context_axis_is_refused_with_the_reason(make_hf_checkpoint, tokenizer):
    sharded = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), mesh=make_mesh("fsdp=4,context=2"))
    with pytest.raises(JaxlmError, match="context axis"):
        Engine(sharded, tokenizer, SMALL)


def test_int8_kv_pages_give_the_int8_cache_generate_results(make_hf_checkpoint, tokenizer, prompts):
    int8 = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), kv_cache_dtype="int8")
    eng = Engine(int8, tokenizer, SMALL)
    assert jax.tree.leaves(eng.kv)[0].dtype == jnp.int8
    eng.warmup()
    before = engine_lib.compile_count()     # a fresh engine: its first steps compile nothing either
    short = [p[:40] for p in prompts]
    got = run(eng, [(p, SamplingParams(max_tokens=8, **GREEDY)) for p in short])
    assert engine_lib.compile_count() == before
    assert [r["tokens"] for r in got] == [generate_alone(int8, p, 8) for p in short]

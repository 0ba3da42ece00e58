"""Long context: chunked prefill, rotary scaling over a generation, int8 cache,
and the needle / passkey / perplexity tools (context parallelism: test_context_parallel.py)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer

TOL = 1e-4


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", ["tiny_gqa", "tiny_left_padded", "tiny_dynamic_ntk"])
def test_chunked_forward_equals_unchunked_on_golden(golden, case, impl):
    ref = np.load(golden(case) / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(str(golden(case)), attention_impl=impl)
    valid = ref["attention_mask"].astype(bool)
    for chunk in (7, 16, 33, 64):  # 7 and 33 divide neither 48, 40 nor 160
        logits = np.asarray(model(ref["input_ids"], ref["attention_mask"], ref["position_ids"], chunk_size=chunk))
        assert np.abs(logits - ref["logits"])[valid].max() <= TOL, chunk


def test_chunked_generate_equals_unchunked(golden, make_hf_checkpoint, rng):
    path = golden("tiny_chat_realvocab")
    ref = np.load(path / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(str(path), dtype="float32", param_dtype="float32")
    for chunk in (16, 50):
        out = model.generate(ref["prompt_ids"], max_new_tokens=12, prefill_chunk_size=chunk,
                             return_dict_in_generate=True, output_logits=True)
        np.testing.assert_array_equal(out["sequences"], ref["greedy_ids"])
        assert np.abs(out["logits"][0] - ref["step_logits"]).max() <= TOL
    # dynamic NTK past max_position_embeddings, a left-padded batch
    ntk = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(rope_scaling={"type": "dynamic", "factor": 2.0},
                                                                  max_position_embeddings=16))
    prompt = rng.integers(3, 256, (3, 37))
    mask = np.ones_like(prompt)
    mask[1, :9] = 0
    plain = ntk.generate(prompt, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    np.testing.assert_array_equal(ntk.generate(prompt, attention_mask=mask, max_new_tokens=9, eos_token_id=None,
                                               prefill_chunk_size=10), plain)


def test_dynamic_ntk_is_the_original_below_max_positions(make_hf_checkpoint, rng):
    """When prompt + new tokens fit max_position_embeddings the base is never scaled."""
    prompt = rng.integers(3, 256, (2, 20))
    dynamic = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(
        rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=64))
    plain = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(max_position_embeddings=64))
    a = dynamic.generate(prompt, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True)
    b = plain.generate(prompt, max_new_tokens=10, eos_token_id=None, return_dict_in_generate=True,
                       output_logits=True)
    np.testing.assert_array_equal(a["sequences"], b["sequences"])
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_kv_cache_dtypes_stay_within_documented_error(golden):
    path = golden("tiny_chat_realvocab")
    ref = np.load(path / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(str(path), dtype="float32", param_dtype="float32")
    P = ref["prompt_ids"].shape[1]
    for cache, bound in (("bfloat16", 0.05), ("int8", 0.15)):  # documented in the README
        out = model.generate(ref["prompt_ids"], max_new_tokens=12, kv_cache_dtype=cache,
                             return_dict_in_generate=True, output_logits=True)
        assert np.abs(out["logits"][0] - ref["step_logits"]).max() <= bound, cache
        assert (out["sequences"][0, P:] == ref["greedy_ids"][0, P:]).all(), cache


class NeedleOracle:
    """Answers with the number the prompt hides: a known-good model for the scoring path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, ids, max_new_tokens, **kwargs):
        text = self.tokenizer.decode(ids[0])
        number = re.search(r"(?:number for \w+ is|pass key is) (\d+)", text).group(1)
        reply = self.tokenizer.encode(number, add_special_tokens=False)
        return np.asarray([list(ids[0]) + reply])


@pytest.mark.parametrize("passkey", [False, True], ids=["needle", "passkey"])
def test_needle_pipeline(tmp_path, passkey):
    from jaxlm.eval import haystack
    from jaxlm.eval.needle import heatmap, run

    tok = InternLM2Tokenizer.from_pretrained(str(REPO / "jaxlm/assets/tiny"))
    for length in (1500, 4000):
        for depth in (0, 25, 50, 75, 100):
            prompt = haystack.build(tok, length, depth, "The special magic number for Oslo is 4711.", "Q?", "4711")
            assert abs(len(prompt.ids) - length) <= 0.01 * length
            assert abs(100 * prompt.depth - depth) <= 2.0
            assert tok.decode(prompt.ids[prompt.needle_token:]).lstrip().startswith("The special magic number")
    results = run(NeedleOracle(tok), tok, [1200], [0, 50, 100], passkey=passkey, log=lambda m: None)
    assert [r["score"] for r in results] == [1.0, 1.0, 1.0]
    png = heatmap(results, str(tmp_path / "h.png"), "oracle")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_needle_cli_and_ppl_on_the_tiny_model(tmp_path):
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint
    from jaxlm.config import InternLM2Config
    from jaxlm.assets import TINY_DIR
    from jaxlm.files import copy_if_present

    model_dir = tmp_path / "tiny"
    write_hf_checkpoint(str(model_dir), InternLM2Config.from_pretrained(TINY_DIR))
    copy_if_present(TINY_DIR, str(model_dir), ["tokenizer.model", "tokenizer_config.json"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-m", "jaxlm.eval.needle", "--model", str(model_dir), "--lengths", "1k,2k",
                          "--depths", "0,50,100", "--out", str(tmp_path / "needle"), "--chunk", "256"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "needle" / "results.json").read_text())
    assert len(summary["results"]) == 6 and {r["length"] for r in summary["results"]} == {1000, 2000}
    assert (tmp_path / "needle" / "heatmap.png").stat().st_size > 1000
    # the same cases on a context axis of 2 devices, ring prefill: the same replies
    ring = subprocess.run([sys.executable, "-m", "jaxlm.eval.needle", "--model", str(model_dir), "--lengths", "1k,2k",
                           "--depths", "0,50,100", "--out", str(tmp_path / "ring"), "--chunk", "256",
                           "--mesh", "context=2", "--context-attention", "ring"],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert ring.returncode == 0, ring.stderr[-2000:]
    ring_summary = json.loads((tmp_path / "ring" / "results.json").read_text())
    assert [r["reply"] for r in ring_summary["results"]] == [r["reply"] for r in summary["results"]]
    # sliding-window perplexity: chunked windows give the same number, every token scored once
    from jaxlm.eval.ppl import perplexity

    model = InternLM2ForCausalLM.from_pretrained(str(model_dir))
    tok = InternLM2Tokenizer.from_pretrained(str(model_dir))
    ids = tok.encode(" ".join(["The capital of France is Paris."] * 60))
    a = perplexity(model, ids, context=128, stride=64)
    b = perplexity(model, ids, context=128, stride=64, chunk=48)
    assert a["scored"] == len(ids) - 1 and abs(a["nll"] - b["nll"]) < 1e-5
    cli = subprocess.run([sys.executable, "-m", "jaxlm", "eval", "ppl", "--model", str(model_dir), "--data",
                          str(tmp_path / "needle" / "results.json"), "--context", "64", "--stride", "32", "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout.splitlines()[-1])["perplexity"] > 1

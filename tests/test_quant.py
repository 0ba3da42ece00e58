"""Weight-only int8 / int4 quantization: quality against a numpy reference quantizer on the golden
cases, scale axes on uneven channels, memory, the compiled program, sharding, checkpoints and the
converter CLI, generation / chunked prefill, QLoRA and the merged export."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from jaxlm import ConfigError, InternLM2ForCausalLM
from jaxlm.sharding import make_mesh

FORWARD_CASES = ["tiny_gqa", "tiny_dynamic_ntk", "tiny_left_padded"]
MATRICES = ("wqkv", "wo", "w1", "w2", "w3")


# ------------------------------------------------------------ the reference
def reference_dequantized(w: np.ndarray, in_dims: int, mode: str) -> np.ndarray:
    """Straightforward symmetric round-to-nearest, written independently of jaxlm.nn.quant:
    int8 one scale per output row, int4 one scale per group of min(128, in) inputs."""
    rows = w.reshape(int(np.prod(w.shape[: w.ndim - in_dims])), -1).astype(np.float64)
    out = np.empty_like(rows)
    if mode == "int8":
        scale = np.abs(rows).max(1, keepdims=True) / 127
        scale[scale == 0] = 1
        out = np.clip(np.round(rows / scale), -127, 127) * scale
    else:
        size = min(128, rows.shape[1])
        for start in range(0, rows.shape[1], size):
            block = rows[:, start:start + size]
            scale = np.abs(block).max(1, keepdims=True) / 7
            scale[scale == 0] = 1
            out[:, start:start + size] = np.clip(np.round(block / scale), -7, 7) * scale
    return out.reshape(w.shape).astype(np.float32)


def projections(model):
    for layer in model.model.layers:
        yield from ((n, getattr(layer.attention if n in ("wqkv", "wo") else layer.feed_forward, n))
                    for n in MATRICES)


def with_reference_weights(model, mode):
    """The float32 model with every decoder matrix replaced by the reference's dequantized weights."""
    for _, proj in projections(model):
        proj.kernel.set_value(jnp.asarray(reference_dequantized(np.asarray(proj.kernel[...]), proj.in_dims, mode)))
    return model


def rel_error(x, ref):
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def top1(x, ref):
    return float((x.argmax(-1) == ref.argmax(-1)).mean())


# ----------------------------------------------------------------- quality
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("case", FORWARD_CASES)
def test_quality_matches_the_reference_quantizer(golden, case, mode):
    path = str(golden(case))
    ref = np.load(golden(case) / "golden.npz")
    valid = ref["attention_mask"].astype(bool)
    args = (ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    golden_logits = ref["logits"][valid]
    quantized = InternLM2ForCausalLM.from_pretrained(path, dtype="float32", quantize=mode)
    for _, proj in projections(quantized):   # every decoder matrix really is quantized
        assert proj.kernel[...].dtype == jnp.dtype(mode) and proj.kernel_scale is not None
    assert quantized.output.quantize is None and quantized.model.tok_embeddings.embedding[...].dtype == jnp.float32
    reference = with_reference_weights(InternLM2ForCausalLM.from_pretrained(path, dtype="float32"), mode)
    q, r = np.asarray(quantized(*args))[valid], np.asarray(reference(*args))[valid]
    assert rel_error(q, golden_logits) <= 1.2 * rel_error(r, golden_logits)
    assert top1(q, golden_logits) >= top1(r, golden_logits) - 0.02
    assert rel_error(q, golden_logits) < (0.05 if mode == "int8" else 0.5)   # sanity: it is a quantized model, not noise


def test_uneven_channels_need_per_output_scales(tmp_path, rng):
    """A few output channels and a block of input channels scaled up: per-tensor and per-input-channel
    scales visibly fail there, per-output-channel (int8) and per-group (int4) do not."""
    model = InternLM2ForCausalLM(tiny_config(hidden_size=64, intermediate_size=256), dtype="float32",
                                 rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    for _, proj in projections(model):
        w = np.asarray(proj.kernel[...]).copy()
        rows = w.reshape(-1, int(np.prod(w.shape[w.ndim - proj.in_dims:])))
        rows[rng.choice(rows.shape[0], 3, replace=False)] *= 30.0   # loud output channels
        rows[:, 8:16] *= 8.0                                        # a loud block of inputs
        proj.kernel.set_value(jnp.asarray(rows.reshape(w.shape)))
    ids = rng.integers(3, 256, (2, 24))
    float_logits = np.asarray(model(ids))
    float_state = {n: np.asarray(p.kernel[...]) for n, p in enumerate(p for _, p in projections(model))}

    def error_with(fake_quant):
        for n, (_, proj) in enumerate(projections(model)):
            proj.kernel.set_value(jnp.asarray(fake_quant(float_state[n], proj.in_dims)))
        out = rel_error(np.asarray(model(ids)), float_logits)
        for n, (_, proj) in enumerate(projections(model)):
            proj.kernel.set_value(jnp.asarray(float_state[n]))
        return out

    def per_tensor(w, _):
        s = np.abs(w).max() / 127
        return np.round(w / s) * s

    def per_input(w, in_dims):
        rows = w.reshape(-1, int(np.prod(w.shape[w.ndim - in_dims:])))
        s = np.abs(rows).max(0, keepdims=True) / 127
        return (np.round(rows / s) * s).reshape(w.shape)

    model.save_pretrained(str(tmp_path / "uneven"))   # a float jaxlm checkpoint, quantized as it loads
    ours = {}
    for mode in ("int8", "int4"):
        q = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "uneven"), quantize=mode)
        ours[mode] = rel_error(np.asarray(q(ids)), float_logits)
        assert ours[mode] <= 1.2 * error_with(lambda w, n: reference_dequantized(w, n, mode))
    wrong = min(error_with(per_tensor), error_with(per_input))
    assert wrong > 2.5 * ours["int8"], (ours, wrong)


def test_int8_teacher_forced_greedy_agreement(golden):
    path = str(golden("tiny_gqa"))
    ref = np.load(golden("tiny_gqa") / "golden.npz")
    fp = InternLM2ForCausalLM.from_pretrained(path, dtype="float32")
    prompt = ref["input_ids"][:1, :16]
    seq = np.asarray(fp.generate(prompt, max_new_tokens=48, eos_token_id=None))
    q8 = InternLM2ForCausalLM.from_pretrained(path, dtype="float32", quantize="int8")
    fp_choice = np.asarray(fp(seq))[0, 15:-1].argmax(-1)
    q_choice = np.asarray(q8(seq))[0, 15:-1].argmax(-1)
    assert (fp_choice == seq[0, 16:]).all()
    assert (q_choice == fp_choice).mean() >= 0.90


# -------------------------------------------- memory and the compiled program
def device_bytes(tree) -> int:
    """Bytes the arrays take in device memory (int4 packed two per byte), from XLA's own accounting."""
    return jax.jit(lambda t: t).lower(tree).compile().memory_analysis().argument_size_in_bytes


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """Matrices larger than a CPU dequantization block, so a float copy would be visible."""
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint

    path = str(tmp_path_factory.mktemp("medium"))
    write_hf_checkpoint(path, tiny_config(hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                                          num_key_value_heads=2, vocab_size=512), seed=0, dtype="float32")
    return path


@pytest.mark.parametrize("mode, bound", [("int8", 0.30), ("int4", 0.18)])
def test_layer_memory_and_no_float_weight_in_the_program(medium, mode, bound, rng):
    fp = InternLM2ForCausalLM.from_pretrained(medium)
    q = InternLM2ForCausalLM.from_pretrained(medium, quantize=mode)
    layers = lambda m: nnx.state(m.model.layers, nnx.Param)
    rest = lambda m: [v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)) if p[1] != "layers"]
    assert device_bytes(layers(q)) <= bound * device_bytes(layers(fp))
    assert device_bytes(rest(q)) <= device_bytes(rest(fp))
    ids = jnp.asarray(rng.integers(3, 512, (1, 16)))
    graphdef, state = nnx.split(q)
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x)).lower(state, ids).compile().as_text()
    int_type = {"int8": "s8", "int4": "s4"}[mode]
    for _, proj in projections(q):
        rows, cols = int(np.prod(proj.kernel[...].shape[:-proj.in_dims])), int(np.prod(
            proj.kernel[...].shape[-proj.in_dims:]))
        shape = ",".join(map(str, proj.kernel[...].shape))
        assert re.search(rf"{int_type}\[{shape}\]", hlo)        # the int weight is what the program takes
        for shape in (f"{rows},{cols}", f"{cols},{rows}", ",".join(map(str, proj.kernel[...].shape))):
            assert not re.search(rf"f32\[{shape}\]", hlo), f"a float copy of {proj.kernel[...].shape}"
    # after a forward, no device buffer beyond the model's state (no kept dequantized copy)
    before = {id(a) for a in jax.live_arrays()}
    out = q(np.asarray(ids))
    del out
    extra = [a for a in jax.live_arrays() if id(a) not in before and not a.is_deleted()]
    assert sum(a.nbytes for a in extra) <= 4 * 1024, [(a.shape, a.dtype) for a in extra]


# ------------------------------------------------------------------ sharding
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_sharded_quantized_logits_equal_single_device(golden, mode):
    path = str(golden("tiny_gqa"))
    ref = np.load(golden("tiny_gqa") / "golden.npz")
    single = np.asarray(InternLM2ForCausalLM.from_pretrained(path, quantize=mode)(ref["input_ids"]))
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = InternLM2ForCausalLM.from_pretrained(path, quantize=mode, mesh=mesh)
    wqkv = sharded.model.layers[0].attention.wqkv
    assert wqkv.kernel[...].sharding.spec[0] == "tensor"            # split by kv group, like the float kernel
    assert wqkv.kernel_scale[...].sharding.spec[0] == "tensor"
    assert tuple(sharded.model.layers[0].feed_forward.w1.kernel[...].sharding.spec) == ("tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(sharded(ref["input_ids"])), single, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------- checkpoints
def python_m(module, *args):
    """``python -m module args`` on one device, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


def convert(*args):
    return python_m("checkpoints_convert.quantize", *args)


def test_quantize_cli_and_quantized_checkpoints(golden, tmp_path):
    src = str(golden("tiny_chat_realvocab"))   # bf16, two shards
    ids = np.load(golden("tiny_chat_realvocab") / "golden.npz")["greedy_ids"][:, :40]
    out = tmp_path / "q4"
    result = convert("--src", src, "--dst", str(out), "--bits", "4")
    assert result.returncode == 0, result.stderr
    loaded = InternLM2ForCausalLM.from_pretrained(str(out), dtype="float32")
    assert loaded.options.quantize == "int4"
    on_the_fly = InternLM2ForCausalLM.from_pretrained(src, dtype="float32", quantize="int4")
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(on_the_fly(ids)))
    assert os.path.isfile(out / "tokenizer.model")
    # save_pretrained of a quantized model, and a jaxlm float source, give the same checkpoint contents
    on_the_fly.save_pretrained(str(tmp_path / "saved"))
    np.testing.assert_array_equal(np.asarray(InternLM2ForCausalLM.from_pretrained(str(tmp_path / "saved"),
                                                                                  dtype="float32")(ids)),
                                  np.asarray(loaded(ids)))
    with pytest.raises(Exception, match="quantized with quantize='int4'"):
        InternLM2ForCausalLM.from_pretrained(str(out), quantize="int8")
    # bad input: one line on stderr, non-zero exit, nothing at --dst
    small = str(golden("tiny_gqa"))
    for n, (source, bits) in enumerate(((small, "3"), (str(tmp_path / "nope"), "8"), (str(out), "8"))):
        dst = tmp_path / f"bad{n}"
        result = convert("--src", source, "--dst", str(dst), "--bits", bits)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert not dst.exists()
    result = convert("--src", small, "--dst", str(out), "--bits", "8")
    assert result.returncode != 0 and "--overwrite" in result.stderr
    result = convert("--src", small, "--dst", str(out), "--bits", "8", "--overwrite")
    assert result.returncode == 0 and InternLM2ForCausalLM.from_pretrained(str(out)).options.quantize == "int8"
    # a float jaxlm checkpoint as the source gives the same int values as quantizing the HF one on the fly
    from jaxlm.checkpoint.convert import hf_to_jaxlm
    from jaxlm.checkpoint.quantized import quantize_checkpoint

    hf_to_jaxlm(small, str(tmp_path / "float"))
    quantize_checkpoint(str(tmp_path / "float"), str(tmp_path / "from_jaxlm"), mode="int4")
    small_ids = np.load(golden("tiny_gqa") / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(
        np.asarray(InternLM2ForCausalLM.from_pretrained(str(tmp_path / "from_jaxlm"))(small_ids)),
        np.asarray(InternLM2ForCausalLM.from_pretrained(small, quantize="int4")(small_ids)))
    # jaxlm_to_hf of a quantized checkpoint writes full precision (the dequantized weights)
    from jaxlm.checkpoint.convert import jaxlm_to_hf

    jaxlm_to_hf(str(out), str(tmp_path / "hf"))
    back = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert back.options.quantize is None and back.model.layers[0].attention.wo.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(back(small_ids)),
                               np.asarray(InternLM2ForCausalLM.from_pretrained(str(out))(small_ids)), atol=1e-4)


# --------------------------------------------------- generation, chat, LoRA
def test_generation_chunked_prefill_and_chat_with_quantized_weights(golden):
    from jaxlm import InternLM2Tokenizer

    path = str(golden("tiny_chat_realvocab"))
    ref = np.load(golden("tiny_chat_realvocab") / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(path, dtype="float32", quantize="int8", scan_layers=True)
    prompt = ref["prompt_ids"]
    full = np.asarray(model(prompt))
    np.testing.assert_allclose(np.asarray(model(prompt, chunk_size=32)), full, atol=1e-4)
    out = np.asarray(model.generate(prompt, max_new_tokens=6, eos_token_id=None))
    # greedy decoding through the KV cache equals teacher-forced argmax of the same quantized model
    forced = np.asarray(model(out))[0, prompt.shape[1] - 1:-1].argmax(-1)
    np.testing.assert_array_equal(out[0, prompt.shape[1]:], forced)
    tok = InternLM2Tokenizer.from_pretrained(path)
    answer, history = model.chat(tok, "Hello", do_sample=False, max_new_tokens=4)
    assert isinstance(answer, str) and history[-1][0] == "Hello"


def test_qlora_trains_adapters_on_an_int4_base_and_exports_full_precision(make_hf_checkpoint, tmp_path, rng):
    import dataclasses

    from test_train import lora_config

    from jaxlm.train.trainer import train

    base = make_hf_checkpoint(vocab_size=512)
    cfg = lora_config(base, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize="int4"))
    result = train(cfg, str(tmp_path / "run"), progress=False, log=lambda m: None)
    losses = [loss for _, loss in result["losses"]]
    assert losses[-1] < losses[0]
    merged = InternLM2ForCausalLM.from_pretrained(result["final"])
    assert merged.options.quantize is None
    assert merged.model.layers[0].feed_forward.w1.kernel[...].dtype == jnp.float32
    from jaxlm.train.lora import load_adapter

    adapted = InternLM2ForCausalLM.from_pretrained(base, quantize="int4")
    load_adapter(adapted, str(tmp_path / "run" / "adapter"))
    ids = rng.integers(3, 512, (2, 20))
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(adapted(ids)), atol=1e-4)
    with pytest.raises(ConfigError, match="QLoRA"):   # full fine-tuning of int weights is refused
        dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False)).validate()


def test_jaxlm_serve_quantize_serves_greedy_completions(golden, tmp_path):
    import json
    import urllib.request

    from live_server import LiveServer

    from jaxlm import InternLM2Tokenizer

    path = str(golden("tiny_chat_realvocab"))
    srv = LiveServer(tmp_path / "serve.log", tmp_path / "cache", "--model", path, "--quantize", "int8",
                     "--max-num-seqs", "2", "--max-model-len", "256", "--num-pages", "40", "--dtype", "float32")
    try:
        srv.wait_healthy()
        body = json.dumps({"model": os.path.basename(path), "prompt": "The capital of France is",
                           "max_tokens": 5, "temperature": 0, "ignore_eos": True}).encode()
        request = urllib.request.Request(srv.url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.load(r)
    finally:
        srv.stop()
    assert reply["usage"]["completion_tokens"] == 5
    tok = InternLM2Tokenizer.from_pretrained(path)
    model = InternLM2ForCausalLM.from_pretrained(path, dtype="float32", quantize="int8")
    ids = np.asarray([tok.encode("The capital of France is")])
    out = np.asarray(model.generate(ids, max_new_tokens=5, eos_token_id=None))[0, ids.shape[1]:]
    assert reply["choices"][0]["text"] == tok.decode(out.tolist(), skip_special_tokens=True)


# ------------------------------------------------------------- plan and info
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_plan_and_info_count_quantized_weight_bytes(medium, mode, tmp_path):
    import json

    from jaxlm.config import InternLM2Config
    from jaxlm.plan import plan_memory

    config = InternLM2Config.from_pretrained(medium)
    model = InternLM2ForCausalLM.from_pretrained(medium, quantize=mode)
    planned = plan_memory(config, dtype="float32", param_dtype="float32", quantize=mode, context=64)
    assert planned.params == device_bytes(nnx.state(model, nnx.Param))
    assert planned.params < plan_memory(config, dtype="float32", param_dtype="float32", context=64).params
    model.save_pretrained(str(tmp_path / "q"))
    info = json.loads(python_m("jaxlm", "info", "--model", str(tmp_path / "q"), "--json").stdout)
    assert info["quantize"] == mode and info["weight_bytes"] == planned.params
    bad = python_m("jaxlm", "plan", "--model", medium, "--quantize", mode, "--train", "full")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: quantize: a quantized base trains only through LoRA (train='lora'), not 'full'"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cpu_kernel_equals_the_dequantized_matmul(rng, mode):
    import shutil

    from jaxlm.kernels import cpu_int8
    from jaxlm.nn import quant

    assert cpu_int8.available() == (shutil.which("g++") is not None or shutil.which("c++") is not None)
    # 200 inputs: not a multiple of the SIMD width, and int4 groups of 128 + 72
    w = rng.standard_normal((96, 200)).astype(np.float32) * 0.02
    q, s = quant.quantize(w, 1, mode)
    exact = quant.dequantize(q, s, 1, mode).astype(np.float64)
    matmul = jax.jit(lambda x: quant.matmul(x, jnp.asarray(q), jnp.asarray(s), mode, jnp.float32))
    for tokens in (1, 5, 16):
        x = rng.standard_normal((tokens, 200)).astype(np.float32)
        np.testing.assert_allclose(np.asarray(matmul(x)), x.astype(np.float64) @ exact.T, atol=2e-5)
    g = jax.grad(lambda x: quant.matmul(x, jnp.asarray(q), jnp.asarray(s), mode, jnp.float32).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(exact.sum(0), x.shape), atol=2e-5)
    target = cpu_int8.TARGET if mode == "int8" else cpu_int8.TARGET_INT4
    assert (target in matmul.lower(x[:1]).as_text()) == cpu_int8.available()

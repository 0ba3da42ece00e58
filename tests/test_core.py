"""The core paths: attention dispatch, explicit decoding, options, config hashing, axis rules, structure."""

from __future__ import annotations

import ast
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import ConfigError, InternLM2Config, InternLM2ForCausalLM, ModelOptions
from jaxlm.nn import attention_plan
from jaxlm.nn.attention import AttentionMask, xla_attention, xla_decode_attention
from jaxlm.nn.attention_plan import attend, flash_args, plan_attention
from jaxlm.nn.linear import Projection
from jaxlm.runtime import forward
from jaxlm.sharding import axis_rules, constrain, jit_with_rules, make_mesh, named_sharding

from conftest import REPO, tiny_config

B, T, K, G, D = 2, 16, 2, 2, 64
Q_SHAPE = (B, T, K, G, D)


# ------------------------------------------------------------ attention dispatch
@pytest.fixture(autouse=False)
def fresh_log():
    attention_plan._logged.clear()
    yield


def test_cudnn_runs_a_plain_causal_prefill_on_gpu():
    """The plain causal forward (T == S, no offset) used to raise KeyError: 'q_offset'."""
    plan = plan_attention(AttentionMask(T), Q_SHAPE, impl="cudnn", dtype=jnp.bfloat16, backend="gpu", mesh_axes={})
    assert (plan.mode, plan.impl, plan.fallback) == ("prefill", "cudnn", None)


@pytest.mark.parametrize("mask, dtype, why", [
    (AttentionMask(T), jnp.float32, "float32"),
    (AttentionMask(2 * T, True, jnp.int32(T)), jnp.bfloat16, "KV cache"),
    (AttentionMask(T, True, 0, None, jnp.ones((B, T), bool)), jnp.bfloat16, "padding"),
    (AttentionMask(T, True, 0, None, None, jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32)),
     jnp.bfloat16, "segment"),
], ids=["float32", "cache-offset", "padding", "packed"])
def test_cudnn_falls_back_to_pallas_and_says_so_once(mask, dtype, why, caplog, fresh_log):
    with caplog.at_level(logging.WARNING, logger="jaxlm.attention"):
        for _ in range(3):
            plan = plan_attention(mask, Q_SHAPE, impl="cudnn", dtype=dtype, backend="gpu", mesh_axes={})
    assert plan.impl == "pallas" and plan.flash is not None and why in plan.fallback
    logged = [r for r in caplog.records if r.name == "jaxlm.attention"]
    assert len(logged) == 1 and why in logged[0].getMessage()


def test_decoding_never_asks_cudnn():
    plan = plan_attention(AttentionMask.decoding(64, jnp.full((B,), 5)), (B, 1, K, G, D), impl="cudnn",
                          backend="gpu", mesh_axes={})
    assert (plan.mode, plan.impl) == ("decode", "pallas") and "decode kernel" in plan.fallback


def test_cudnn_without_a_gpu_is_a_clear_error(make_hf_checkpoint):
    with pytest.raises(ConfigError, match="attention_impl='cudnn'.*backend is 'cpu'"):
        plan_attention(AttentionMask(T), Q_SHAPE, impl="cudnn", backend="cpu", mesh_axes={})
    with pytest.raises(ConfigError, match="attention_impl='cudnn'"):
        InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), attention_impl="cudnn")


@pytest.mark.parametrize("backend, want", [("cpu", "xla"), ("gpu", "pallas"), ("tpu", "pallas")])
def test_auto_picks_the_backends_implementation(backend, want):
    assert plan_attention(AttentionMask(T), Q_SHAPE, backend=backend, mesh_axes={}).impl == want


def test_per_row_offsets_fall_back_to_xla_prefill():
    mask = AttentionMask(32, True, jnp.asarray([3, 9]))
    plan = plan_attention(mask, Q_SHAPE, impl="pallas", backend="gpu", mesh_axes={})
    assert plan.impl == "xla" and "per-row" in plan.fallback


def test_context_axis_plans_on_a_mesh():
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 4}
    prefill = plan_attention(AttentionMask(T), Q_SHAPE, impl="xla", context="ring", mesh_axes=sizes)
    assert (prefill.context_axis, prefill.context_strategy) == ("context", "ring")
    xla = plan_attention(AttentionMask(T), Q_SHAPE, impl="xla", context="xla", mesh_axes=sizes)
    assert xla.context_strategy is None
    decode = plan_attention(AttentionMask.decoding(T, jnp.full((B,), 3)), (B, 1, K, G, D), mesh_axes=sizes)
    assert (decode.mode, decode.context_strategy) == ("decode", "lse_merge")


def test_single_batch_key_mask_broadcasts_to_every_row(rng):
    """A key_valid of batch 1 with B > 1 rows gives [B, S] segment ids (was [1, S])."""
    S = 32
    valid = jnp.asarray(np.arange(S)[None, :] >= 4)                    # [1, S]: the first 4 keys dropped
    mask = AttentionMask(S, True, jnp.int32(S - T), key_valid=valid)
    args, _ = flash_args(mask, Q_SHAPE)
    assert args.segment_ids.shape == (B, T) and args.kv_segment_ids.shape == (B, S)
    q = jnp.asarray(rng.standard_normal(Q_SHAPE), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
    plan = plan_attention(mask, Q_SHAPE, impl="pallas", backend="gpu", mesh_axes={})
    np.testing.assert_allclose(attend(q, k, v, mask, plan), xla_attention(q, k, v, mask), atol=2e-5)


def test_decode_reads_the_lengths_of_its_mask(rng):
    """The decode mask is what the decode attention reads: slots past key_lengths are ignored."""
    S = 48
    q = jnp.asarray(rng.standard_normal((B, 1, K, G, D)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([7, 30], jnp.int32)
    mask = AttentionMask.decoding(S, lengths)
    want = xla_decode_attention(q.reshape(B, K * G, D), kc, vc, lengths)
    for impl in ("xla", "pallas"):
        plan = plan_attention(mask, q.shape, impl=impl, backend="cpu" if impl == "xla" else "gpu", mesh_axes={})
        got = attend(q, kc, vc, mask, plan).reshape(B, K * G, D)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=impl)
    # the same mask's dense form (XLA prefill cores) agrees
    np.testing.assert_allclose(xla_attention(q, kc, vc, mask).reshape(B, K * G, D), want, atol=2e-5)


# ---------------------------------------------------- decoding is never inferred
@pytest.fixture(scope="module")
def left_padded(golden):
    path = golden("tiny_left_padded")
    return InternLM2ForCausalLM.from_pretrained(str(path)), np.load(path / "golden.npz")


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_one_token_chunks_keep_the_padding_mask(left_padded, chunk):
    model, ref = left_padded
    valid = ref["attention_mask"].astype(bool)
    logits = np.asarray(model(ref["input_ids"], attention_mask=ref["attention_mask"], chunk_size=chunk))
    assert np.abs(logits - ref["logits"])[valid].max() <= 1e-4


def test_one_token_prefill_chunks_generate_the_same(left_padded):
    model, ref = left_padded
    ids, mask = ref["input_ids"], ref["attention_mask"]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None)
    for chunk in (1, 2, 3):
        np.testing.assert_array_equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None,
                                                     prefill_chunk_size=chunk), plain, err_msg=str(chunk))


# ------------------------------------------------------------- options, config
def test_one_options_object_from_every_entry_point(make_hf_checkpoint):
    opts = ModelOptions(scan_layers=True, remat="full", kv_cache_dtype="int8", context_attention="ring")
    built = InternLM2ForCausalLM(tiny_config(), opts, attention_impl="xla")
    assert built.options == ModelOptions.build(opts, attention_impl="xla").resolve()
    loaded = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), opts)
    assert loaded.options.context_attention == "ring" and loaded.options.kv_cache_dtype == np.dtype("int8")
    with pytest.raises(ConfigError, match="unknown model option 'scan_layer'"):
        InternLM2ForCausalLM(tiny_config(), scan_layer=True)
    with pytest.raises(ConfigError, match="context_attention must be one of"):
        ModelOptions(context_attention="zigzag")


def test_train_config_model_section_is_model_options():
    from jaxlm.train.config import ModelSection, TrainConfig, apply_overrides

    cfg = apply_overrides(TrainConfig(), ["model.context_attention=ring", "model.kv_cache_dtype=int8",
                                          "model.max_context=4096"])
    assert isinstance(cfg.model, ModelSection) and isinstance(cfg.model, ModelOptions)
    opts = ModelOptions.of(cfg.model)
    assert (opts.context_attention, opts.kv_cache_dtype, opts.max_context) == ("ring", np.dtype("int8"), 4096)
    with pytest.raises(ConfigError, match="remat must be one of"):
        apply_overrides(TrainConfig(), ["model.remat=sometimes"])


def test_equal_configs_hash_equally():
    a = tiny_config(extra={"architectures": ["InternLM2ForCausalLM"]})
    b = tiny_config(extra={"torch_dtype": "bfloat16", "auto_map": {"AutoModel": "x"}})
    assert a == b and hash(a) == hash(b)
    assert hash(a) != hash(tiny_config(rope_theta=5.0))


# --------------------------------------------------------- axis rules key jits
def test_changing_axis_rules_recompiles():
    mesh = make_mesh("data=8")
    spread = jit_with_rules(lambda x: constrain(x * 2, ("act_batch", None)))
    x = jax.device_put(jnp.ones((8, 4)), named_sharding(mesh, (None, None)))
    with jax.set_mesh(mesh):
        split = spread(x)
        with axis_rules({"act_batch": None}):
            whole = spread(x)
    assert split.sharding.spec[0] == "data" and whole.sharding.spec[0] is None


def test_rules_keyed_jit_still_donates_by_name():
    """Positional calls donate the argument named in donate_argnames (the KV pages, the decode carry)."""
    step = jit_with_rules(lambda pages, x: (pages + x, x), donate_argnames=("pages",))
    pages = jnp.zeros((64, 64))
    out, _ = step(pages, jnp.ones(()))
    assert pages.is_deleted() and float(out[0, 0]) == 1.0


def test_model_forward_follows_the_rules_in_force(make_hf_checkpoint):
    mesh = make_mesh("data=2,fsdp=4")
    model = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(), mesh=mesh)
    ids = np.arange(64).reshape(8, 8) % 200 + 3
    compiled = forward._compiled_logits
    default = model(ids)
    before = compiled.cache_size()
    with axis_rules({"act_vocab": ("data", "fsdp"), "act_batch": None}):
        vocab_split = model(ids)
        assert compiled.cache_size() == before + 1         # a new program for the new layout...
        model(ids)
        assert compiled.cache_size() == before + 1         # ...compiled once
    model(ids)
    assert compiled.cache_size() == before + 1             # and the default rules' program is still there
    np.testing.assert_allclose(default, vocab_split, atol=1e-5)


def test_a_large_replicated_parameter_is_reported(caplog):
    big = tiny_config(vocab_size=4099, hidden_size=64)           # 4099 x 64 float32 = 1.0 MiB, prime vocab
    with caplog.at_level(logging.WARNING, logger="jaxlm.sharding"):
        named_sharding(make_mesh("tensor=8"), ("vocab", "embed"), (big.vocab_size, 128), np.float32)
    assert any("'tensor' (8) does not divide 'vocab' (4099)" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------- structure
def test_projection_spec_must_match_the_kernel():
    from flax import nnx

    Projection("BTE,VE->BTV", (10, 4), ("vocab", "embed"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="output must be 'BTV'"):
        Projection("BTE,VE->BTE", (10, 4), ("vocab", "embed"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="names 3 kernel dims"):
        Projection("BTHD,EHD->BTE", (10, 4), ("embed", "heads"), in_dims=2, rngs=nnx.Rngs(0))


def _module_imports(package: pathlib.Path):
    """module -> (jaxlm modules it imports at top level, function-local jaxlm imports)."""
    paths = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    modules = {}

    def targets(node):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""   # `from pkg import sub` depends on pkg.sub, not on pkg's __init__
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]

    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        top, local = set(), []

        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top.update(t for t in targets(node) if t.startswith("jaxlm"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and any(
                            t.startswith("jaxlm") for t in targets(inner)):
                        local.append(f"{name}:{inner.lineno}")
        modules[name] = (top, local)
    return modules


def test_the_package_has_no_import_cycles_and_no_local_jaxlm_imports():
    modules = _module_imports(REPO / "jaxlm")
    graph = {m: {t for t in top if t in modules and t != m} for m, (top, _) in modules.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
    local = [where for _, (_, locals_) in modules.items() for where in locals_]
    assert not local, f"function-local jaxlm imports: {local}"

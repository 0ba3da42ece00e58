"""The memory planner against XLA's own buffer assignment (compiled.memory_analysis())."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from jaxlm import ConfigError, InternLM2Config, InternLM2ForCausalLM
from jaxlm.checkpoint.loading import param_sharding
from jaxlm.runtime import engine
from jaxlm.runtime.sampling import SamplerFlags
from jaxlm.plan import plan_memory
from jaxlm.sharding import make_mesh, named_sharding
from jaxlm.train.step import OptimizerConfig, make_optimizer, train_step

CONFIG = InternLM2Config(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=8192)


def device_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def abstract_model(mesh, scan=True, config=CONFIG, **options):
    model = nnx.eval_shape(lambda: InternLM2ForCausalLM(config, scan_layers=scan, rngs=nnx.Rngs(0), **options))
    return model, lambda var: jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                                   sharding=param_sharding(var, mesh))


def compiled_train_step(mesh_spec, batch, T, remat, dtype, config=CONFIG):
    mesh = make_mesh(mesh_spec)
    model, place = abstract_model(mesh, config=config, dtype=dtype, param_dtype="float32", remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(place, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt = make_optimizer(OptimizerConfig())
    opt_state = optax.tree_map_params(
        opt, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
        jax.eval_shape(opt.init, params), params,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                            sharding=named_sharding(mesh, (None,) * s.ndim)))
    rows = named_sharding(mesh, ("act_batch", None))
    batch_spec = {k: jax.ShapeDtypeStruct((batch, T), jnp.float32 if k == "loss_weights" else jnp.int32,
                                          sharding=rows) for k in ("input_ids", "targets", "loss_weights")}
    with jax.set_mesh(mesh):
        return train_step.lower(graphdef, params, rest, opt_state, batch_spec, optimizer=opt).compile()


def compiled_prefill(mesh_spec, batch, T, dtype, chunk=None, cache_dtype=None, scan=True, extra=16,
                     context_attention="allgather", config=CONFIG):
    mesh = make_mesh(mesh_spec)
    model, place = abstract_model(mesh, scan=scan, config=config, dtype=dtype, param_dtype=dtype,
                                  context_attention=context_attention)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rows = named_sharding(mesh, ("act_batch",))
    with jax.set_mesh(mesh):
        return engine.prefill.lower(
            graphdef, state, jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=named_sharding(mesh, ("act_batch", None))),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows), jnp.int32(T), None, jnp.int32(0),
            jax.ShapeDtypeStruct((batch,), bool, sharding=rows), cache_len=T + extra,
            cache_dtype=jnp.dtype(cache_dtype or dtype), num_new=extra, flags=SamplerFlags(), chunk=chunk).compile()


@pytest.mark.parametrize("mesh, batch, T, remat, dtype", [
    ("fsdp=8", 8, 1024, "full", "float32"),
    ("fsdp=8", 8, 1024, "none", "float32"),
    ("fsdp=4,tensor=2", 8, 1024, "full", "float32"),
    ("fsdp=8", 8, 4096, "full", "float32"),
])
def test_training_plan_within_15_percent(mesh, batch, T, remat, dtype):
    xla = device_bytes(compiled_train_step(mesh, batch, T, remat, dtype))
    plan = plan_memory(CONFIG, mesh=mesh, batch=batch, context=T, train="full", remat=remat, dtype=dtype)
    print(f"train {mesh} {batch}x{T} remat={remat}: plan {plan.total / 2**20:.0f} MiB, XLA {xla / 2**20:.0f} MiB")
    assert abs(plan.total / xla - 1) <= 0.15


@pytest.mark.parametrize("mesh, batch, T, dtype", [
    ("fsdp=4,context=2", 4, 4096, "bfloat16"),
    ("tensor=8", 1, 8192, "bfloat16"),
    ("fsdp=8", 8, 2048, "float32"),
])
def test_inference_plan_within_15_percent(mesh, batch, T, dtype):
    xla = device_bytes(compiled_prefill(mesh, batch, T, dtype))
    plan = plan_memory(CONFIG, mesh=mesh, batch=batch, context=T + 16, dtype=dtype, chunk=T, scan_layers=True)
    print(f"prefill {mesh} {batch}x{T}: plan {plan.total / 2**20:.0f} MiB, XLA {xla / 2**20:.0f} MiB")
    assert abs(plan.total / xla - 1) <= 0.15


@pytest.mark.parametrize("mesh, batch, T, chunk, cache, strategy", [
    ("fsdp=8", 8, 16384, 1024, "float32", "allgather"),
    ("fsdp=4,context=2", 4, 16384, 2048, "float32", "allgather"),
    ("fsdp=8", 8, 16384, 1024, "int8", "allgather"),
    ("context=8", 1, 32768, 2048, "float32", "allgather"),
    ("context=8", 1, 32768, 2048, "float32", "ring"),
])
def test_long_context_plan_within_15_percent(mesh, batch, T, chunk, cache, strategy):
    """Chunked prefill into a long cache (context axis and its two strategies, int8 cache), unrolled layers."""
    xla = device_bytes(compiled_prefill(mesh, batch, T, "float32", chunk=chunk, cache_dtype=cache, scan=False,
                                        extra=512, context_attention=strategy))
    plan = plan_memory(CONFIG, mesh=mesh, batch=batch, context=T + 512, dtype="float32", chunk=chunk,
                       kv_cache_dtype=cache, scan_layers=False, context_attention=strategy)
    print(f"chunked prefill {mesh} {batch}x{T} chunk {chunk} {cache} cache: plan {plan.total / 2**20:.0f} MiB, "
          f"XLA {xla / 2**20:.0f} MiB")
    assert abs(plan.total / xla - 1) <= 0.15


# Model shapes outside the fit (CONFIG): other widths, depth, heads, head_dim, vocab.
SMALL = tiny_config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
TINY = tiny_config(num_hidden_layers=2, max_position_embeddings=4096)

CPU_BF16_FIT = ("prefill factors fitted on bfloat16 compiles, which XLA:CPU runs in float32: "
                "a float32 one-shot prefill is over-planned (1.89 here)")
ONE_SHOT_DENSE = ("a one-shot prefill attends only the prompt's keys (dense causal blocks, every block's scores "
                  "live), but the planner picks blockwise from chunk x cache length: under-planned (0.37 here)")


@pytest.mark.parametrize("kind, config, mesh, batch, T, options", [
    # training: a data axis, remat dots_saveable, another model shape (0.93 of XLA)
    ("train", TINY, "data=2,fsdp=4", 8, 1024, dict(remat="dots_saveable")),
    # chunked prefill on context x tensor with an int8 cache (1.12 of XLA)
    ("prefill", CONFIG, "context=4,tensor=2", 1, 16384, dict(chunk=2048, cache="int8", scan=False, extra=512)),
    pytest.param("prefill", SMALL, "fsdp=2,tensor=4", 2, 4096, dict(cache="int8"),
                 marks=pytest.mark.xfail(strict=True, reason=CPU_BF16_FIT)),
    pytest.param("prefill", TINY, "fsdp=8", 8, 2048, dict(),
                 marks=pytest.mark.xfail(strict=True, reason=ONE_SHOT_DENSE)),
], ids=["train-tiny-data2fsdp4-dots", "prefill-context4tensor2-int8", "prefill-small-fsdp2tensor4-f32", "prefill-tiny-fsdp8-one-shot"])
def test_plan_on_held_out_configs(kind, config, mesh, batch, T, options):
    """The planner on configurations outside the fit set (see the fitted constants in jaxlm/plan.py),
    float32 throughout; the misses still open are strict xfails, with their measured ratio. (A
    training miss too costly to compile here: SMALL on fsdp=2,tensor=4, 4x2048, remat full, 0.85.)"""
    if kind == "train":
        xla = device_bytes(compiled_train_step(mesh, batch, T, options["remat"], "float32", config=config))
        plan = plan_memory(config, mesh=mesh, batch=batch, context=T, train="full", remat=options["remat"],
                           dtype="float32")
    else:
        chunk, cache, scan, extra = (options.get("chunk"), options.get("cache"), options.get("scan", True),
                                     options.get("extra", 16))
        xla = device_bytes(compiled_prefill(mesh, batch, T, "float32", chunk=chunk, cache_dtype=cache, scan=scan,
                                            extra=extra, config=config))
        plan = plan_memory(config, mesh=mesh, batch=batch, context=T + extra, dtype="float32", chunk=chunk or T,
                           kv_cache_dtype=cache, scan_layers=scan)
    print(f"held out {kind} {mesh} {batch}x{T} {options}: plan {plan.total / 2**20:.1f} MiB, "
          f"XLA {xla / 2**20:.1f} MiB, ratio {plan.total / xla:.3f}")
    assert abs(plan.total / xla - 1) <= 0.15


def test_sharding_and_optimizer_accounting():
    one = plan_memory(CONFIG, mesh="fsdp=1", batch=8, context=512, train="full")
    eight = plan_memory(CONFIG, mesh="fsdp=8", batch=8, context=512, train="full")
    n = CONFIG.num_params()
    assert one.params == n * 4 and one.optimizer == 2 * n * 4 and one.gradients == n * 4
    norms = (2 * CONFIG.num_hidden_layers + 1) * CONFIG.hidden_size * 4  # replicated on every device
    assert abs(eight.params * 8 - one.params) <= 8 * norms
    lora = plan_memory(CONFIG, batch=1, context=512, train="lora", lora_rank=8, dtype="bfloat16")
    assert lora.params > n * 2 and lora.optimizer < one.optimizer / 50
    int8 = plan_memory(CONFIG, context=65536, kv_cache_dtype="int8", dtype="bfloat16")
    bf16 = plan_memory(CONFIG, context=65536, dtype="bfloat16")
    assert 0.5 <= int8.kv_cache / bf16.kv_cache < 0.6
    with pytest.raises(ConfigError, match="valid tensor sizes: 1, 2, 4, 8"):
        plan_memory(CONFIG, mesh="tensor=16")


def jaxlm(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_plan_cli_verdicts():
    no = jaxlm("plan", "--preset", "internlm2-chat-7b", "--mesh", "fsdp=4,tensor=2", "--batch", "1",
               "--context", "200000", "--device", "v5e")
    assert no.returncode == 3 and "DOES NOT FIT" in no.stdout and "int8" in no.stdout
    yes = jaxlm("plan", "--preset", "internlm2-chat-7b", "--mesh", "fsdp=8", "--batch", "8", "--context", "4096",
                "--train", "full", "--device-memory", "95GiB", "--json")
    out = json.loads(yes.stdout)
    assert yes.returncode == 0 and out["fits"] is True and out["optimizer"] == 2 * out["gradients"]
    # 200K tokens on a context axis of 8: the ring holds two K/V shards, the all-gather a whole layer
    long = {s: json.loads(jaxlm("plan", "--preset", "internlm2-chat-7b", "--mesh", "context=8", "--context", "200000",
                                "--chunk", "8192", "--context-attention", s, "--device", "v5p", "--json").stdout)
            for s in ("allgather", "ring")}
    layer_kv = 2 * 200000 * 8 * 128 * 2  # K and V of one layer in bfloat16
    assert long["allgather"]["activations"] - long["ring"]["activations"] == pytest.approx(
        layer_kv * (1 - 2 / 8), rel=0.01)
    assert long["ring"]["kv_cache"] == long["allgather"]["kv_cache"]
    bad = jaxlm("plan", "--preset", "internlm2-7b", "--mesh", "tensor=3")
    assert bad.returncode == 1 and "valid tensor sizes: 1, 2, 4, 8" in bad.stderr

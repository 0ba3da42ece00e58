"""Meshes of 8 simulated CPU devices: same numbers as one device, really split weights."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from jaxlm import ConfigError, InternLM2ForCausalLM
from jaxlm.checkpoint import hf_reader
from jaxlm.nn.embed import Embed
from jaxlm.nn.params import logical_axes
from jaxlm.sharding import MeshConfig, axis_rules, logical_to_spec, make_mesh, mesh_sizes

TOL = 1e-4


def needs_8_devices():
    if jax.device_count() < 8:
        pytest.fail("the mesh tests need XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                    "(tests/conftest.py sets it before jax is imported)")


def mesh(data, fsdp, tensor, context=1):
    needs_8_devices()
    return make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor, context=context))


# tiny_gqa has 2 kv heads: tensor may be 1 or 2. (1, 2, 4) runs on a 4-kv-head model below.
@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (8, 1, 1), (2, 4, 1)], ids=str)
@pytest.mark.parametrize("case", ["tiny_gqa", "tiny_left_padded", "tiny_dynamic_ntk"])
def test_golden_logits_on_meshes(golden, case, shape):
    ref = np.load(golden(case) / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(str(golden(case)), mesh=mesh(*shape))
    logits = np.asarray(model(ref["input_ids"], ref["attention_mask"], ref["position_ids"]))
    valid = ref["attention_mask"].astype(bool)
    assert np.abs(logits - ref["logits"])[valid].max() <= TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_tensor_4_on_four_kv_heads(make_hf_checkpoint, rng, scan):
    path = make_hf_checkpoint(num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    ids = rng.integers(3, 256, (3, 24))  # 3 rows: padded to the mesh
    single = np.asarray(InternLM2ForCausalLM.from_pretrained(path)(ids))
    sharded = InternLM2ForCausalLM.from_pretrained(path, mesh=mesh(1, 2, 4), scan_layers=scan)
    np.testing.assert_allclose(np.asarray(sharded(ids)), single, atol=TOL, rtol=0)


def test_weights_are_split_as_the_rules_say(golden):
    m = mesh(2, 2, 2)
    model = InternLM2ForCausalLM.from_pretrained(str(golden("tiny_gqa")), mesh=m)
    sizes = mesh_sizes(m)
    checked = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        expected = logical_to_spec(logical_axes(var), sizes, shape=value.shape)
        assert value.sharding.spec == expected, path
        if any(s is not None for s in expected):
            local = value.addressable_shards[0].data
            assert local.size < value.size, path
            checked += 1
    assert checked >= 6
    layer = model.model.layers[0]
    # wqkv [kv_heads, G + 2, head_dim, embed]: kv groups over tensor, embed over fsdp
    assert layer.attention.wqkv.kernel[...].sharding.spec == jax.sharding.PartitionSpec(
        "tensor", None, None, "fsdp")
    assert layer.attention.wqkv.kernel[...].addressable_shards[0].data.shape == (1, 6, 16, 64)
    # Megatron: w1/w3 column-parallel, w2 and wo row-parallel (the mlp/heads dim over tensor)
    assert layer.feed_forward.w1.kernel[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert layer.feed_forward.w2.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert layer.attention.wo.kernel[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_each_host_reads_only_its_slices(golden, monkeypatch):
    reads = []
    original = hf_reader.HFCheckpoint.read_jaxlm

    def spy(self, entry, index=None):
        out = original(self, entry, index)
        if entry.hf_name == "model.layers.0.feed_forward.w1.weight":
            reads.append(out.shape)
        return out

    monkeypatch.setattr(hf_reader.HFCheckpoint, "read_jaxlm", spy)
    InternLM2ForCausalLM.from_pretrained(str(golden("tiny_gqa")), mesh=mesh(1, 4, 2))
    # [mlp=352, embed=128] over tensor=2 x fsdp=4: eight distinct 176x32 slices, none whole
    assert sorted(set(reads)) == [(176, 32)] and len(reads) == 8


def test_save_on_one_mesh_restore_on_another(golden, tmp_path):
    ref = np.load(golden("tiny_gqa") / "golden.npz")
    for scan, source, target in [(False, (2, 2, 2), (1, 8, 1)), (True, (1, 4, 2), None)]:
        model = InternLM2ForCausalLM.from_pretrained(str(golden("tiny_gqa")), mesh=mesh(*source),
                                                     scan_layers=scan)
        dst = tmp_path / f"ckpt{scan}"
        model.save_pretrained(str(dst))
        restored = InternLM2ForCausalLM.from_pretrained(
            str(dst), mesh=None if target is None else mesh(*target), scan_layers=not scan)
        logits = np.asarray(restored(ref["input_ids"]))
        assert np.abs(logits - ref["logits"]).max() <= TOL


def test_sharded_generate_equals_single_device(golden, rng):
    path = str(golden("tiny_gqa"))
    prompt = rng.integers(3, 1000, (3, 21))
    single = InternLM2ForCausalLM.from_pretrained(path).generate(prompt, max_new_tokens=9, eos_token_id=None)
    for shape, scan in [((2, 2, 2), False), ((1, 8, 1), True), ((8, 1, 1), False)]:
        model = InternLM2ForCausalLM.from_pretrained(path, mesh=mesh(*shape), scan_layers=scan)
        np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=9, eos_token_id=None), single)
        streamed = [int(t[1]) for t in model.stream_generate(prompt, max_new_tokens=9, eos_token_id=None)]
        assert streamed == single[1, 21:].tolist()


def test_invalid_meshes_are_clear_errors(golden):
    needs_8_devices()
    with pytest.raises(ConfigError, match=r"tensor=4 does not divide num_key_value_heads=2.*valid tensor "
                                          r"sizes: 1, 2"):
        InternLM2ForCausalLM.from_pretrained(str(golden("tiny_gqa")), mesh=make_mesh("fsdp=2,tensor=4"))
    with pytest.raises(ConfigError, match="needs 16 devices, but only 8 are available"):
        make_mesh("data=2,fsdp=8")
    with pytest.raises(ConfigError, match="unknown axis 'model'"):
        make_mesh("model=2")
    with pytest.raises(ConfigError, match="does not divide the 8 available devices"):
        make_mesh("tensor=3")
    assert MeshConfig.parse("tensor=2").resolve(8) == {"data": 1, "fsdp": 4, "tensor": 2, "context": 1}


# ------------------------------------------------------------ embedding lookup
REMAT = "Involuntary full rematerialization"

# Runs in a fresh process, so that XLA compiles (and logs) here, whatever this
# session compiled or cached before: the forward and a training-style gradient
# of the same checkpoint on one device and on data=2,fsdp=2,tensor=2.
_EMBED_WORKER = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxlm import InternLM2ForCausalLM
from jaxlm.sharding import make_mesh, named_sharding

path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)
ids = rng.integers(0, 256, (4, 16))
targets = rng.integers(0, 256, (4, 16))
mesh = make_mesh("data=2,fsdp=2,tensor=2")

def loss_fn(graphdef, rest):
    def loss(params, ids, targets):
        logits = nnx.merge(graphdef, params, rest).forward(ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    return jax.jit(jax.value_and_grad(loss))

results = {}
for name, m in [("single", None), ("sharded", mesh)]:
    model = InternLM2ForCausalLM.from_pretrained(path, mesh=m)
    results[name + "_logits"] = np.asarray(model(ids))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grad = loss_fn(graphdef, rest)
    if m is None:
        loss, grads = grad(params, ids, targets)
    else:
        rows = named_sharding(m, ("act_batch", None))
        with jax.set_mesh(m):
            loss, grads = grad(params, jax.device_put(ids, rows), jax.device_put(targets, rows))
    results[name + "_loss"] = np.asarray(loss)
    for key, g in nnx.to_flat_state(grads):
        results[name + "_grad/" + "/".join(map(str, key))] = np.asarray(g.get_value())
np.savez(out, **results)
"""


def test_embedding_lookup_partitions_without_rematerialization(make_hf_checkpoint, tmp_path, seed):
    needs_8_devices()
    path = make_hf_checkpoint()
    out = tmp_path / "results.npz"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0")  # XLA's warnings must reach stderr
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a cached executable would not be compiled (nor logged)
    proc = subprocess.run([sys.executable, "-c", _EMBED_WORKER, path, str(out), str(seed)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remat = [line for line in proc.stderr.splitlines() if REMAT in line]
    assert not remat, "XLA rematerialized:\n" + "\n".join(line[:400] for line in remat)
    r = np.load(out)
    np.testing.assert_allclose(r["sharded_logits"], r["single_logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(r["sharded_loss"], r["single_loss"], atol=1e-6, rtol=0)
    grads = [k for k in r.files if k.startswith("single_grad/")]
    assert any("tok_embeddings" in k for k in grads)
    for key in grads:
        np.testing.assert_allclose(r[key.replace("single", "sharded", 1)], r[key], atol=1e-6, rtol=0,
                                   err_msg=key)


EMBED_CASES = {  # vocab size, rule overrides, the table's spec on data=2,fsdp=2,tensor=2
    "vocab_over_tensor": (256, {}, ("tensor", "fsdp")),
    "vocab_not_divisible": (255, {}, (None, "fsdp")),
    "embed_axis_not_on_rows": (256, {"act_batch": "data"}, ("tensor", "fsdp")),
    "vocab_axis_on_rows": (256, {"vocab": "fsdp", "embed": "tensor"}, ("fsdp", "tensor")),
}


@pytest.mark.parametrize("case", EMBED_CASES)
def test_embed_lookup_is_exact_on_a_mesh(case, seed, rng):
    """Embed equals jnp.take (values and gradients), with no mesh and under a mesh, in jit and eagerly."""
    vocab, rules, table_spec = EMBED_CASES[case]
    m = mesh(2, 2, 2)
    embed = Embed(vocab, 64, init_std=1.0, rngs=nnx.Rngs(seed))
    table = embed.embedding[...]
    ids = jnp.asarray(rng.integers(0, vocab, (8, 12)), jnp.int32)
    # Integer cotangents: sums of them are exact in any order, so gradients compare exactly.
    cot = jnp.asarray(rng.integers(-4, 5, (8, 12, 64)), jnp.float32)
    graphdef, state = nnx.split(embed)

    def lookup(state, ids):
        return nnx.merge(graphdef, state)(ids)

    def grad(state, ids):
        return jax.grad(lambda s: jnp.sum(lookup(s, ids) * cot))(state).embedding.get_value()

    expected = np.asarray(jnp.take(table, ids, axis=0))
    expected_grad = np.asarray(jax.grad(lambda t: jnp.sum(jnp.take(t, ids, axis=0) * cot))(table))
    np.testing.assert_array_equal(np.asarray(embed(ids)), expected)
    np.testing.assert_array_equal(np.asarray(grad(state, ids)), expected_grad)

    with axis_rules(rules):
        spec = logical_to_spec(("vocab", "embed"), mesh_sizes(m), shape=table.shape)
        assert spec == jax.sharding.PartitionSpec(*table_spec)
        placed = jax.tree.map(lambda v: jax.device_put(v, jax.sharding.NamedSharding(m, spec)), state)
        rows = jax.device_put(ids, jax.sharding.NamedSharding(m, logical_to_spec(("act_batch", None), mesh_sizes(m))))
        with jax.set_mesh(m):
            np.testing.assert_array_equal(np.asarray(jax.jit(lookup)(placed, rows)), expected)
            np.testing.assert_array_equal(np.asarray(jax.jit(grad)(placed, rows)), expected_grad)
            np.testing.assert_array_equal(np.asarray(lookup(placed, rows)), expected)

"""Context parallelism: ring attention, explicit all-gather and the LSE-merged decode
equal one device (logits, greedy tokens, gradients), on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxlm import InternLM2ForCausalLM
from jaxlm.kernels import flash_attention_with_lse, reference_attention
from jaxlm.nn.attention import AttentionMask, xla_attention, xla_decode_attention
from jaxlm.nn.attention_plan import attend, plan_attention
from jaxlm.sharding import ACT, context_axis, make_mesh, named_sharding

TOL = 1e-4
STRATEGIES = ["ring", "allgather", "xla"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("spec", ["context=8", "data=2,context=4", "fsdp=2,tensor=2,context=2"])
def test_context_parallel_model_equals_single_device(golden, rng, spec, strategy):
    path = str(golden("tiny_gqa"))
    ref = np.load(golden("tiny_gqa") / "golden.npz")
    valid = ref["attention_mask"].astype(bool)
    prompt = rng.integers(3, 1000, (2, 48))
    single = InternLM2ForCausalLM.from_pretrained(path).generate(prompt, max_new_tokens=8, eos_token_id=None)
    for impl, scan in (("xla", False), ("pallas", True)):
        model = InternLM2ForCausalLM.from_pretrained(path, mesh=make_mesh(spec), attention_impl=impl,
                                                     scan_layers=scan, context_attention=strategy)
        for chunk in (None, 16):  # the 48-token left-padded batch: 48 and 16 split over the axis
            logits = np.asarray(model(ref["input_ids"], ref["attention_mask"], chunk_size=chunk))
            assert np.abs(logits - ref["logits"])[valid].max() <= TOL, (impl, chunk)
        for chunk in (None, 16):
            got = model.generate(prompt, max_new_tokens=8, eos_token_id=None, prefill_chunk_size=chunk,
                                 kv_cache_dtype="float32")
            np.testing.assert_array_equal(got, single, err_msg=f"{impl} chunk={chunk}")


@pytest.mark.parametrize("strategy, impl", [("allgather", "xla"), ("allgather", "pallas"), ("ring", "xla"),
                                            ("ring", "pallas")])
def test_context_parallel_gradients_equal_single_device(golden, rng, strategy, impl):
    """Training on a context axis: the explicit strategies are differentiable and exact."""
    from flax import nnx

    path = str(golden("tiny_gqa"))
    ids = rng.integers(3, 1000, (2, 48))
    weights = jnp.asarray(rng.standard_normal((2, 48, 1000)), jnp.float32)

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest).forward(ids) * weights)
        return [np.asarray(g) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))]

    want = grads(InternLM2ForCausalLM.from_pretrained(path))
    mesh = make_mesh("fsdp=2,context=4")
    model = InternLM2ForCausalLM.from_pretrained(path, mesh=mesh, context_attention=strategy, attention_impl=impl)
    with jax.set_mesh(mesh):
        got = grads(model)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-4)


def _masks(B, T, S, rng):
    """Masks of every kind the model builds: chunk against a cache, padding, packing, non-causal."""
    valid = jnp.asarray(np.arange(S)[None, :] >= np.array([[0], [5]]))               # row 1 left-padded
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1), jnp.int32)
    return {
        "chunk_of_cache": AttentionMask(S, True, jnp.int32(S - T), key_valid=valid),
        "chunk_mid_cache": AttentionMask(S, True, jnp.int32(8), key_valid=valid[:1]),
        "key_lengths": AttentionMask(S, True, S - T, key_lengths=jnp.asarray([S - 3, S], jnp.int32)),
        "packed": AttentionMask(S, True, S - T, q_segment=seg[:, S - T:], kv_segment=seg),
        "bidirectional": AttentionMask(S, False, 0, key_valid=valid),
    }


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_prefill_strategies_equal_plain_attention(rng, strategy, impl):
    B, T, S, K, G, D = 2, 32, 64, 2, 2, 16
    q = jnp.asarray(rng.standard_normal((B, T, K, G, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
    mesh = make_mesh("data=2,context=4")
    with jax.set_mesh(mesh):
        q_s = jax.device_put(q, named_sharding(mesh, ACT["queries"], q.shape))
        k_s, v_s = (jax.device_put(x, named_sharding(mesh, ACT["kv_cache"], x.shape)) for x in (k, v))
        assert q_s.addressable_shards[0].data.shape[1] == T // 4
        for name, mask in _masks(B, T, S, rng).items():
            plan = plan_attention(mask, q.shape, impl=impl, context=strategy)
            assert (plan.context_axis, plan.context_strategy) == ("context", strategy), name
            run = jax.jit(lambda q, k, v, mask: attend(q, k, v, mask, plan_attention(mask, q.shape, impl=impl,
                                                                                      context=strategy)))
            got = run(q_s, k_s, v_s, mask)
            want = xla_attention(q, k, v, mask)
            rows = np.broadcast_to(np.asarray(mask.dense(T).any(-1)), (B, T))   # rows that read a key
            if mask.key_lengths is not None:  # queries past a row's length are padding (ignored)
                rows = rows & (np.asarray(mask.q_offset) + np.arange(T) < np.asarray(mask.key_lengths)[:, None])
            np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=2e-5, err_msg=name)
            hlo = run.lower(q_s, k_s, v_s, mask).compile().as_text()
            if strategy == "ring":  # K/V travel by collective-permute, never gathered whole
                assert "collective-permute" in hlo and f"f32[1,{S},2,{D}]" not in hlo, name


def test_prefill_falls_back_when_the_axis_does_not_split_the_sequence():
    q = jnp.ones((1, 30, 2, 2, 16))
    k = jnp.ones((1, 30, 2, 16))
    with jax.set_mesh(make_mesh("context=8")):
        plan = plan_attention(AttentionMask(30), q.shape, impl="xla")
        assert plan.context_strategy is None   # left to XLA's partitioner
        np.testing.assert_allclose(jax.jit(lambda q, k: attend(q, k, k, AttentionMask(30), plan))(q, k),
                                   xla_attention(q, k, k, AttentionMask(30)), atol=1e-6)


B, T, S, Hq, Hkv, D = 1, 128, 128, 4, 2, 64     # the lse-kernel cases: one 128 x 128 tile


def _kernel_case(seed, tpu):
    """Random float32 q, k, v of the shapes above and the interpret-mode kwargs of each kernel family."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32) for _ in range(2))
    kw = dict(interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
              block_sizes=dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)) if tpu else {}
    return rng, q, k, v, kw


@pytest.mark.parametrize("tpu", [False, True], ids=["gpu-interpret", "tpu-interpret"])
def test_flash_kernel_log_sum_exp_for_ring_steps(seed, tpu):
    """The kernel's (out, lse) for a key shard: causal offsets before, inside and after it."""
    _, q, k, v, kw = _kernel_case(seed, tpu)
    run = jax.jit(lambda offset: flash_attention_with_lse(q, k, v, causal=True, q_offset=offset, **kw))
    scores = np.einsum("bthd,bshd->bhts", q, jnp.repeat(k, Hq // Hkv, axis=2)) / np.sqrt(D)
    for offset in (-T, -40, 0, 60):   # -T: this shard lies wholly after every query
        out, lse = run(jnp.int32(offset))
        slots = offset + np.arange(T)
        seen = slots >= 0
        with np.errstate(divide="ignore"):
            causal = np.where(np.arange(S)[None, :] <= slots[:, None], scores, -np.inf)
            want_lse = np.logaddexp.reduce(causal, axis=-1)                        # [B, H, T]
        np.testing.assert_allclose(np.asarray(lse)[0][seen], want_lse[0].T[seen], atol=1e-4)
        assert (np.asarray(lse)[0][~seen] < -1e30).all()            # a row with no key weighs nothing in a merge
        if offset == 0:  # the plain causal case
            np.testing.assert_allclose(out, reference_attention(q, k, v, causal=True), atol=1e-4)


@pytest.mark.parametrize("tpu", [False, True], ids=["gpu-interpret", "tpu-interpret"])
def test_flash_kernel_log_sum_exp_gradients(seed, tpu):
    """d/d(q, k, v) of a loss on both outputs, (out, lse), against plain float32 math."""
    rng, q, k, v, kw = _kernel_case(seed, tpu)
    w_out = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32)
    w_lse = jnp.asarray(rng.standard_normal((B, T, Hq)), jnp.float32)

    def reference(q, k, v, offset):
        kq, vq = (jnp.repeat(x, Hq // Hkv, axis=2) for x in (k, v))
        s = jnp.einsum("bthd,bshd->bhts", q, kq) / np.sqrt(D)
        seen = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]                  # [T, S]
        s = jnp.where(seen, s, -jnp.inf)
        has_key = seen.any(-1)[None, None, :, None]
        lse = jax.nn.logsumexp(jnp.where(has_key, s, 0.0), axis=-1)                       # [B, H, T]
        p = jnp.where(has_key, jnp.exp(jnp.where(has_key, s, 0.0) - lse[..., None]), 0.0)
        out = jnp.einsum("bhts,bshd->bthd", p, vq)
        return out, jnp.swapaxes(lse, 1, 2), has_key[0, 0, :, 0]

    for offset in (-40, 0, 60):
        def loss(fn):
            def f(q, k, v):
                out, lse, rows = fn(q, k, v)
                return jnp.sum(out * w_out) + jnp.sum(jnp.where(rows[None, :, None], lse * w_lse, 0.0))
            return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

        rows = jnp.asarray(offset + np.arange(T) >= 0)
        kernel = lambda q, k, v: flash_attention_with_lse(q, k, v, causal=True, q_offset=jnp.int32(offset),
                                                          **kw) + (rows,)
        got, want = loss(kernel), loss(lambda q, k, v: reference(q, k, v, offset))
        for name, g, w in zip("qkv", got, want):
            np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-3, err_msg=f"d{name} offset={offset}")


def test_decode_merges_cache_shards_by_log_sum_exp(rng):
    """The context-parallel decode: each device's shard, merged by LSE, equals the whole cache."""
    B, S, K, G, D = 2, 64, 2, 2, 16
    q = jnp.asarray(rng.standard_normal((B, K * G, D)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((B, S, K, D)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([5, 50], jnp.int32)  # row 0 lives on the first shard only
    mesh = make_mesh("context=8")
    mask = AttentionMask.decoding(S, lengths)
    q5 = q.reshape(B, 1, K, G, D)
    with jax.set_mesh(mesh):
        assert context_axis() == "context"
        plan = plan_attention(mask, q5.shape, impl="xla")
        assert (plan.mode, plan.context_strategy) == ("decode", "lse_merge")
        cache_sharding = named_sharding(mesh, ACT["kv_cache"])
        kc_s, vc_s = jax.device_put(kc, cache_sharding), jax.device_put(vc, cache_sharding)
        assert kc_s.addressable_shards[0].data.shape[1] == S // 8
        got = jax.jit(lambda q, kc, vc, mask: attend(q, kc, vc, mask, plan))(q5, kc_s, vc_s, mask)
        got = got.reshape(B, K * G, D)
    np.testing.assert_allclose(got, xla_decode_attention(q, kc, vc, lengths), atol=1e-5)

"""KV caches read in place: int8 caches (values + scales, dequantized per block) and paged caches
(pages read through the block table), in the Pallas kernels and the XLA paths.

Kernels run in interpret mode on CPU (GPU kernels with NaN-poisoned outputs, TPU kernels with
NaN uninitialized memory) against the float32 reference over the gathered, dequantized cache;
lowering for CUDA (Triton) and TPU (Mosaic) is checked with jax.export. The in-place claims are
checked on compiled CPU programs: no float copy of an int8 cache, no gathered copy of a row's pages.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer, kernels
from jaxlm.assets import TINY_DIR
from jaxlm.kernels import decode_attention, paged_decode_attention, reference_decode
from jaxlm.kernels.common import poison_outputs
from jaxlm.nn.attention import AttentionMask
from jaxlm.nn.attention_plan import attend_cache, plan_attention
from jaxlm.nn.kv_cache import KVView, empty, empty_pages, quantize, read
from jaxlm.serving.engine import Engine, EngineConfig
from jaxlm.serving.params import SamplingParams
from jaxlm.sharding import ACT, make_mesh, named_sharding

from kernel_checks import TOL, rel_err

TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")


def paged_case(r, lengths, Hq, Hkv, D, page, width, dtype, int8):
    """A shuffled pool with spare pages, each row's pages in its block table and NULL (0) past its end."""
    used = [-(-n // page) for n in lengths]
    P = 1 + sum(used) + 3                                  # page 0 is NULL; 3 pages nobody holds
    ids = r.permutation(np.arange(1, P))
    table = np.zeros((len(lengths), width), np.int32)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = ids[start:start + n]
        start += n
    q = jnp.asarray(r.standard_normal((len(lengths), Hq, D)), jnp.float32).astype(dtype)
    k, v = (jnp.asarray(r.standard_normal((P, page, Hkv, D)), jnp.float32).astype(dtype) for _ in range(2))
    if int8:
        (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
        view = KVView(k, v, k_scale, v_scale, jnp.asarray(table))
    else:
        view = KVView(k, v, block_table=jnp.asarray(table))
    return q, view, jnp.asarray(lengths, jnp.int32)


def reference(q, view: KVView, lengths):
    """float32 attention over the gathered, dequantized cache."""
    k, v = view.dequantized(jnp.float32)
    return reference_decode(q, k, v, lengths)


def scales(view):
    return dict(k_scale=view.k_scale, v_scale=view.v_scale)


PAGED = [  # lengths (ragged, not page multiples, one full table), Hq, Hkv, D, page, width, dtype, int8, TPU too
    ((1, 37, 96), 8, 2, 64, 16, 6, jnp.float32, False, True),       # GQA 4
    ((50, 3, 20), 4, 4, 64, 16, 4, jnp.float32, True, True),        # MHA, int8
    ((70, 129), 8, 1, 128, 32, 5, jnp.bfloat16, True, False),       # MQA, bf16 with int8 pages (GPU kernel only:
]                                                                   # TPU interpret mode is the slow one)


@pytest.mark.parametrize("case", PAGED, ids=["f32-gqa", "int8-mha", "bf16-int8-mqa"])
def test_paged_decode_kernels_interpret(case, rng):
    lengths, Hq, Hkv, D, page, width, dtype, int8, tpu = case
    q, view, n = paged_case(rng, lengths, Hq, Hkv, D, page, width, dtype, int8)
    want = reference(q, view, n)
    with poison_outputs():   # two splits and two blocks per split on the GPU kernel: split-K merge and the loop
        outs = [paged_decode_attention(q, view.k, view.v, view.block_table, n, block_k=page, split=2 * page,
                                       **scales(view))]
    if tpu:
        outs.append(paged_decode_attention(q, view.k, view.v, view.block_table, n, split=2 * page,
                                           interpret=TPU_INTERPRET, **scales(view)))
    for got in outs:
        assert got.shape == q.shape and got.dtype == q.dtype
        assert rel_err(got, want) <= TOL[dtype]


def test_empty_row_and_lse(rng):
    """A row of length 0 gets zeros and a log-sum-exp of -inf (the split-K merge's identity)."""
    q, view, n = paged_case(rng, (0, 21), 4, 2, 64, 16, 3, jnp.float32, True)
    with poison_outputs():
        out, lse = paged_decode_attention(q, view.k, view.v, view.block_table, n, return_lse=True, **scales(view))
    assert (np.asarray(out[0]) == 0).all() and np.isneginf(np.asarray(lse[0])).all()
    assert rel_err(out[1:], reference(q[1:], KVView(view.k, view.v, view.k_scale, view.v_scale,
                                                    view.block_table[1:]), n[1:])) <= 1e-4


@pytest.mark.parametrize("Hq, Hkv, D, dtype, tpu", [(8, 2, 64, jnp.float32, True), (8, 1, 128, jnp.bfloat16, False)])
def test_int8_decode_kernels_interpret(Hq, Hkv, D, dtype, tpu, rng):
    """The contiguous decode kernels take the int8 cache and its scales."""
    B, S = 3, 300
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32).astype(dtype)
    (kq, ks), (vq, vs) = (quantize(jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32).astype(dtype))
                          for _ in range(2))
    lengths = jnp.asarray([1, int(rng.integers(2, S)), S], jnp.int32)
    want = reference(q, KVView(kq, vq, ks, vs), lengths)
    with poison_outputs():
        outs = [decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, block_k=32, split=64)]
    if tpu:
        outs.append(decode_attention(q, kq, vq, lengths, k_scale=ks, v_scale=vs, block_k=128, split=128,
                                     interpret=TPU_INTERPRET))
    for got in outs:
        assert got.dtype == q.dtype and rel_err(got, want) <= TOL[dtype]


def test_attend_cache_routes_pages_and_int8(rng):
    """attend_cache: on CPU ('auto' = XLA) the pure-JAX gather path; with a GPU plan the paged kernel
    (interpret mode here); both equal the reference, float and int8."""
    for int8 in (False, True):
        q3, view, n = paged_case(rng, (5, 40), 8, 2, 64, 16, 4, jnp.float32, int8)
        q = q3.reshape(2, 1, 2, 4, 64)
        mask = AttentionMask.decoding(4 * 16, n)
        want = reference(q3, view, n).reshape(q.shape)
        cpu_plan, gpu_plan = plan_attention(mask, q.shape), plan_attention(mask, q.shape, backend="gpu")
        assert (cpu_plan.impl, gpu_plan.impl) == ("xla", "pallas")
        for plan in (cpu_plan, gpu_plan):
            assert rel_err(jax.jit(lambda q, kv, m: attend_cache(q, kv, m, plan))(q, view, mask), want) <= 1e-4


def test_bad_inputs_are_clear_errors():
    q = jnp.zeros((2, 4, 64))
    pages = jnp.zeros((5, 16, 2, 64), jnp.int8)
    table, n = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match=r"k_scale of shape \(5, 16, 2\)"):
        paged_decode_attention(q, pages, pages, table, n)
    with pytest.raises(ValueError, match="block_table must be"):
        paged_decode_attention(q, pages, pages, table[:1], n, k_scale=jnp.zeros((5, 16, 2)),
                               v_scale=jnp.zeros((5, 16, 2)))
    with pytest.raises(ValueError, match="page_size 24 is not a power of two"):
        paged_decode_attention(q, jnp.zeros((5, 24, 2, 64)), jnp.zeros((5, 24, 2, 64)), table, n, backend="gpu")
    with pytest.raises(ValueError, match="k_scale/v_scale are for int8 caches"):
        decode_attention(q, jnp.zeros((2, 8, 2, 64)), jnp.zeros((2, 8, 2, 64)), n, k_scale=jnp.zeros((2, 8, 2)),
                         v_scale=jnp.zeros((2, 8, 2)))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_in_place_kernels_lower_for_real_hardware(platform):
    """int8 contiguous decode and paged decode (float and int8 pools) lower to Triton / Mosaic."""
    backend = "gpu" if platform == "cuda" else "tpu"
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    S = jax.ShapeDtypeStruct
    marker = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    lower = lambda f, *args: export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*args)
    for D in (64, 128):
        q, n = S((3, 32, D), jnp.bfloat16), S((3,), jnp.int32)
        cache, cache_scale = S((3, 5000, 8, D), jnp.int8), S((3, 5000, 8), jnp.float32)
        int8 = lower(lambda q, k, v, ks, vs, n: decode_attention(q, k, v, n, k_scale=ks, v_scale=vs, backend=backend),
                     q, cache, cache, cache_scale, cache_scale, n)
        pool, table = S((37, 16, 8, D), jnp.bfloat16), S((3, 70), jnp.int32)
        paged = lower(lambda q, k, v, t, n: paged_decode_attention(q, k, v, t, n, backend=backend), q, pool, pool,
                      table, n)
        pool8, pool_scale = S((37, 16, 8, D), jnp.int8), S((37, 16, 8), jnp.float32)
        paged8 = lower(lambda q, k, v, t, n, ks, vs: paged_decode_attention(q, k, v, t, n, k_scale=ks, v_scale=vs,
                                                                            backend=backend),
                       q, pool8, pool8, table, n, pool_scale, pool_scale)
        for exported in (int8, paged, paged8):
            assert exported.mlir_module().count(marker) == 1


def buffers(compiled_text: str, dims) -> set[str]:
    """The array types of the compiled program with these dims (any element type; None: any size)."""
    return set(re.findall(r"\b[a-z0-9]+\[" + ",".join(r"\d+" if d is None else str(d) for d in dims) + r"\]",
                          compiled_text))


def test_int8_cache_is_read_in_place():
    """No float copy of an int8 cache in the compiled decode step (the kernel path: a custom call's
    operands are materialized, so dequantizing first, as before, put one there), nor a padded one
    (500 slots are not a multiple of the kernel's blocks), nor in a blockwise prefill chunk; the XLA
    decode step's temporary memory stays below a float copy."""
    B, S, K, G, D = 2, 500, 2, 4, 64
    cache, lengths = empty((B, S, K, D), jnp.int8), jnp.full((B,), 100, jnp.int32)
    q = jax.ShapeDtypeStruct((B, 1, K, G, D), jnp.float32)

    def decode(q, cache, lengths, backend):
        mask = AttentionMask.decoding(S, lengths)
        return attend_cache(q, read(cache), mask, plan_attention(mask, q.shape, backend=backend))

    kernel = jax.jit(lambda *a: decode(*a, "gpu")).lower(q, cache, lengths).compile().as_text()
    assert buffers(kernel, (B, None, K, D)) == {"s8[2,500,2,64]"}
    xla = jax.jit(lambda *a: decode(*a, "cpu")).lower(q, cache, lengths).compile()
    assert xla.memory_analysis().temp_size_in_bytes < B * S * K * D * 4 / 4

    def chunk(q, cache):   # 1024 queries x 8192 keys: the blockwise path, one key block converted at a time
        mask = AttentionMask(q.shape[1] * 8, True, jnp.int32(7 * q.shape[1]))
        return attend_cache(q, read(cache, mask.kv_len), mask, plan_attention(mask, q.shape, impl="xla"))

    prefill = jax.jit(chunk).lower(jax.ShapeDtypeStruct((1, 1024, K, G, D), jnp.float32),
                                   empty((1, 8192, K, D), jnp.int8)).compile().as_text()
    assert not buffers(prefill, (1, 8192, K, D)) - {"s8[1,8192,2,64]"} and not buffers(prefill, (1, K, 8192, D))


def test_paged_decode_reads_pages_in_place():
    """The paged kernel's compiled step holds the pool and nothing of the rows' gathered shape
    ``[B, n * page, K, D]``, which the XLA gather path (the reference) builds."""
    B, K, G, D, page, n = 2, 2, 4, 64, 16, 16
    pages, table = empty_pages(40, page, K, D, jnp.int8), jnp.zeros((B, n), jnp.int32)
    q, lengths = jax.ShapeDtypeStruct((B, 1, K, G, D), jnp.float32), jnp.full((B,), 100, jnp.int32)

    def decode(q, pages, table, lengths, backend):
        mask = AttentionMask.decoding(n * page, lengths)
        view = KVView(*pages[:2], *pages[2:], block_table=table)
        return attend_cache(q, view, mask, plan_attention(mask, q.shape, backend=backend))

    compiled = {b: jax.jit(lambda *a: decode(*a, b)).lower(q, pages, table, lengths).compile().as_text()
                for b in ("gpu", "cpu")}
    assert not buffers(compiled["gpu"], (B, n * page, K, D)) and buffers(compiled["cpu"], (B, n * page, K, D))


def test_paged_kernel_on_a_tensor_mesh_runs_per_device(rng):
    """With the pool's kv heads split over ``tensor`` (as the serving engine lays it out), the kernel runs
    on each device's heads (shard_map): equal to the reference, and the compiled step gathers nothing."""
    q3, view, n = paged_case(rng, (5, 40), 8, 2, 64, 16, 4, jnp.float32, True)
    q = q3.reshape(2, 1, 2, 4, 64)
    mask = AttentionMask.decoding(4 * 16, n)
    want = reference(q3, view, n).reshape(q.shape)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    with jax.set_mesh(mesh):
        put = lambda x, axes: jax.device_put(x, named_sharding(mesh, ACT[axes]))
        view = KVView(put(view.k, "kv_pages"), put(view.v, "kv_pages"), put(view.k_scale, "kv_page_scale"),
                      put(view.v_scale, "kv_page_scale"), view.block_table)
        assert view.k.addressable_shards[0].data.shape[2] == 1            # one kv head per device
        step = jax.jit(lambda q, kv, m: attend_cache(q, kv, m, plan_attention(m, q.shape, backend="gpu")))
        got = step(q, view, mask)
        compiled = step.lower(q, view, mask).compile().as_text()
    assert rel_err(got, want) <= 1e-4 and "all-gather" not in compiled


def test_engine_decodes_through_the_paged_kernel(make_hf_checkpoint, monkeypatch):
    """``attention_impl="pallas"`` (what "auto" picks on GPU/TPU; interpret mode here) with int8 pages: the
    serving engine's decode step traces the paged kernel, and its greedy tokens equal ``generate`` on the
    XLA path (the float pool takes the same kernel without scales, checked above)."""
    cache = "int8"
    calls = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    path = make_hf_checkpoint()
    xla = InternLM2ForCausalLM.from_pretrained(path, kv_cache_dtype=cache)
    pallas = InternLM2ForCausalLM.from_pretrained(path, kv_cache_dtype=cache, attention_impl="pallas")
    eng = Engine(pallas, InternLM2Tokenizer.from_pretrained(TINY_DIR),
                 EngineConfig(max_num_seqs=2, max_model_len=64, page_size=8, num_pages=12, max_num_batched_tokens=32))
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 250, n)] for i, n in ((0, 13), (1, 21))]
    ids = [eng.add_request(p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)) for p in prompts]
    got = {i: [] for i in ids}
    for _ in range(40):
        if not eng.has_work():
            break
        for out in eng.step():
            got[out.request_id] += out.token_ids
    assert calls, "the decode step did not trace the paged kernel"
    for i, p in zip(ids, prompts):
        assert got[i] == xla.generate(np.asarray([p]), max_new_tokens=5, eos_token_id=None)[0, len(p):].tolist()

"""Pallas kernels on CPU (interpret mode) against a float32 "highest" reference.

Random inputs from the session seed (tests/conftest.py: JAXLM_TEST_SEED, default 0;
JAXLM_TEST_SEED=random for fresh inputs, the seed is printed). GPU kernels run in
interpret mode with every output pre-filled with NaN; TPU kernels run in TPU
interpret mode with uninitialized memory as NaN. Lowering for the real
platforms (Triton for CUDA, Mosaic for TPU) is checked with jax.export.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxlm.kernels import decode_attention, flash_attention, reference_attention, reference_decode
from jaxlm.kernels.common import poison_outputs

from kernel_checks import TOL, rel_err



def inputs(r, B, T, S, Hq, Hkv, D, dtype, segments):
    q, k, v = (jnp.asarray(r.standard_normal(shape), jnp.float32).astype(dtype)
               for shape in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    seg = None
    if segments:
        cuts = np.sort(r.choice(np.arange(1, T), size=(B, segments - 1), replace=True), axis=1) if segments > 1 \
            else np.zeros((B, 0), int)
        seg = jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
    do = jnp.asarray(r.standard_normal((B, T, Hq, D)), jnp.float32).astype(dtype)
    return q, k, v, seg, do


def check_flash(q, k, v, seg, do, causal, dtype, **kw):
    fa = lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, **kw)
    ref = lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg)
    out, vjp = jax.vjp(fa, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    tol = TOL[dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref_out) <= tol
    for name, got, want in zip("qkv", vjp(do), ref_vjp(do.astype(jnp.float32))):
        assert got.shape == want.shape
        assert rel_err(got, want) <= tol, f"d{name}"


FLASH_CASES = [
    # B, T,  S,  Hq, Hkv, D,  causal, segments
    (2, 64, 64, 2, 2, 64, True, 0),       # MHA (ratio 1)
    (2, 45, 77, 4, 2, 64, True, 0),       # ratio 2, T != S, not block multiples
    (1, 40, 40, 4, 1, 64, False, 0),      # MQA (ratio 4), not causal
    (1, 50, 50, 8, 2, 64, True, 3),       # ratio 4, three packed segments
    (1, 33, 33, 8, 1, 64, True, 4),       # ratio 8 MQA, four segments
    (2, 48, 30, 4, 2, 64, False, 0),      # not causal, T > S
    (1, 40, 40, 2, 1, 128, True, 2),      # head dim 128
    (1, 24, 36, 2, 2, 256, True, 0),      # head dim 256
]


# every case in float32, a representative subset in bfloat16
RUNS = [(c, jnp.float32) for c in FLASH_CASES] + [(FLASH_CASES[i], jnp.bfloat16) for i in (1, 3, 6)]


@pytest.mark.parametrize("case, dtype", RUNS, ids=lambda x: x.__name__ if hasattr(x, "__name__") else
                         "B{}T{}S{}Hq{}Hkv{}D{}{}seg{}".format(*x[:6], "causal" if x[6] else "full", x[7])
                         if isinstance(x, tuple) else str(x))
def test_flash_attention_interpret(case, dtype, rng):
    B, T, S, Hq, Hkv, D, causal, segments = case
    q, k, v, seg, do = inputs(rng, B, T, S, Hq, Hkv, D, dtype, segments)
    with poison_outputs():
        check_flash(q, k, v, seg, do, causal, dtype)


def test_poisoning_catches_unwritten_outputs():
    from jax.experimental import pallas as pl

    from jaxlm.kernels.common import pallas_call

    def half(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((32, 128))
    with poison_outputs():
        out = pallas_call(half, grid=(2,), in_specs=[pl.BlockSpec((16, 128), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((16, 128), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    assert np.isnan(np.asarray(out)[16:]).all() and (np.asarray(out)[:16] == 1).all()


@pytest.mark.parametrize("case, dtype", [
    ((1, 200, 200, 4, 2, 128, True, 3), jnp.float32),
    ((1, 130, 260, 2, 1, 64, True, 0), jnp.bfloat16),
    ((1, 140, 140, 2, 2, 128, False, 0), jnp.float32),
], ids=["f32-causal-seg", "bf16-T<S-mqa", "f32-full"])
def test_flash_attention_tpu_interpret(case, dtype, rng):
    B, T, S, Hq, Hkv, D, causal, segments = case
    q, k, v, seg, do = inputs(rng, B, T, S, Hq, Hkv, D, dtype, segments)
    check_flash(q, k, v, seg, do, causal, dtype, interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
                block_sizes=dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128))


@pytest.mark.parametrize("Hq, Hkv, D, dtype", [(8, 2, 64, jnp.float32), (4, 4, 128, jnp.float32),
                                               (8, 1, 64, jnp.bfloat16), (16, 2, 256, jnp.float32)])
def test_decode_attention(Hq, Hkv, D, dtype, rng):
    r = rng
    B, S = 3, 300
    q = jnp.asarray(r.standard_normal((B, Hq, D)), jnp.float32).astype(dtype)
    kc, vc = (jnp.asarray(r.standard_normal((B, S, Hkv, D)), jnp.float32).astype(dtype) for _ in range(2))
    lengths = jnp.asarray([1, int(r.integers(2, S)), S], jnp.int32)   # one, a middle value, the full cache
    want = reference_decode(q, kc, vc, lengths)
    with poison_outputs():
        got = decode_attention(q, kc, vc, lengths, block_k=32, split=64)   # 5 splits: split-K merge
    assert got.shape == q.shape and got.dtype == q.dtype
    assert rel_err(got, want) <= TOL[dtype]
    tpu = decode_attention(q, kc, vc, lengths, block_k=128, split=128,
                           interpret=pltpu.InterpretParams(uninitialized_memory="nan"))
    assert rel_err(tpu, want) <= TOL[dtype]


def test_bad_shapes_are_clear_errors():
    q = jnp.zeros((1, 8, 3, 64))
    k = jnp.zeros((1, 8, 2, 64))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, k)
    with pytest.raises(ValueError, match="head_dim: 320"):
        flash_attention(jnp.zeros((1, 8, 2, 320)), jnp.zeros((1, 8, 2, 320)), jnp.zeros((1, 8, 2, 320)))
    with pytest.raises(ValueError, match="T <= S"):
        flash_attention(jnp.zeros((1, 9, 2, 64)), jnp.zeros((1, 8, 2, 64)), jnp.zeros((1, 8, 2, 64)))
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(jnp.zeros((2, 4, 64)), jnp.zeros((2, 8, 2, 64)), jnp.zeros((2, 8, 2, 64)),
                         jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_real_hardware(platform):
    """Pallas -> Triton (CUDA) and Pallas -> Mosaic (TPU) lowering, checked without the hardware."""
    from jax import export

    backend = "gpu" if platform == "cuda" else "tpu"
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def train_like(q, k, v, seg):
        fa = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, backend=backend)
        return fa(q, k, v), jax.grad(lambda *a: fa(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for D in (64, 128, 256):
        bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
        exported = export.export(jax.jit(train_like), platforms=[platform], disabled_checks=checks)(
            bf16(2, 1000, 8, D), bf16(2, 1000, 2, D), bf16(2, 1000, 2, D), jax.ShapeDtypeStruct((2, 1000), jnp.int32))
        text = exported.mlir_module()
        assert text.count("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") == 4  # fwd, dq, dkdv(+)
        decode = export.export(jax.jit(lambda q, k, v, n: decode_attention(q, k, v, n, backend=backend)),
                               platforms=[platform], disabled_checks=checks)(
            bf16(2, 32, D), bf16(2, 5000, 8, D), bf16(2, 5000, 8, D), jax.ShapeDtypeStruct((2,), jnp.int32))
        assert "tpu_custom_call" in decode.mlir_module() or "xla.gpu.triton" in decode.mlir_module()
    # the ring-attention step: forward with lse at a traced offset, and its gradient
    from jaxlm.kernels import flash_attention_with_lse

    def ring_step(q, k, v, offset):
        f = lambda q, k, v: flash_attention_with_lse(q, k, v, q_offset=offset, backend=backend)
        loss = lambda *a: sum(x.sum() for x in f(*a))
        return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    ring = export.export(jax.jit(ring_step), platforms=[platform], disabled_checks=checks)(
        bf16(1, 512, 8, 128), bf16(1, 512, 2, 128), bf16(1, 512, 2, 128), jax.ShapeDtypeStruct((), jnp.int32))
    assert ring.mlir_module().count("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") == 4


@pytest.mark.parametrize("tpu", [False, True], ids=["gpu-interpret", "tpu-interpret"])
def test_chunk_against_cache_with_traced_offset(tpu, rng):
    """Chunked prefill: queries [start, start + C) against keys [0, S), offset traced under jit."""
    r = rng
    B, S, C, Hq, Hkv, D = 2, 256 if tpu else 90, 128 if tpu else 30, 4, 2, 64
    q_full = jnp.asarray(r.standard_normal((B, S, Hq, D)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, S, Hkv, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(r.integers(0, 2, (B, S)), axis=1), jnp.int32)
    full = reference_attention(q_full, k, v, causal=True, segment_ids=seg)
    kw = dict(interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
              block_sizes=dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)) if tpu else {}

    @jax.jit
    def chunk(start):
        q = jax.lax.dynamic_slice_in_dim(q_full, start, C, 1)
        q_seg = jax.lax.dynamic_slice_in_dim(seg, start, C, 1)
        return flash_attention(q, k, v, causal=True, segment_ids=q_seg, kv_segment_ids=seg, q_offset=start, **kw)

    for start in ((0, 128) if tpu else (0, 30, 60)):
        with poison_outputs():
            got = chunk(jnp.int32(start))
        assert rel_err(got, full[:, start:start + C]) <= 1e-4


def test_gpu_suite_dry_run(tmp_path):
    """`benchmarks/gpu/run_all.sh --dry-run`: the GPU suite, at tiny sizes in interpret mode, runs end to end
    (so it is ready the day a GPU is lent), its correctness checks pass and both tables are written."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(["bash", "benchmarks/gpu/run_all.sh", "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ok = re.search(r"correctness: (\d+)/(\d+) OK", run.stdout)
    assert ok and ok.group(1) == ok.group(2) and "ring merge" in run.stdout
    assert (tmp_path / "summary.txt").stat().st_size > 0 and (tmp_path / "long_context_summary.txt").stat().st_size > 0

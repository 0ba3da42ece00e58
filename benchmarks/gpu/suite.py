"""The GPU suite: kernel correctness on the real GPU, then timings against cuDNN and XLA.

    python benchmarks/gpu/suite.py --out DIR          (on a GPU; what run_all.sh calls)
    python benchmarks/gpu/suite.py --out DIR --dry-run (on CPU: interpret mode, tiny shapes)

Prints a short table last; full logs and a JSON of every number go to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.kernels import (decode_attention, flash_attention, flash_attention_with_lse,  # noqa: E402
                           paged_decode_attention, reference_attention, reference_decode)
from jaxlm.nn.context_parallel import merge_partials  # noqa: E402
from jaxlm.nn.attention import xla_decode_attention  # noqa: E402
from jaxlm.nn.kv_cache import KVView, quantize  # noqa: E402

LOG = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def timed(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``fn(*args)`` (jitted), after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def kv_read_row(row: dict, label: str, fn, args, kv_bytes: int, iters: int) -> dict:
    """One timing row of a KV-reading kernel: seconds and GB/s of KV read, or the error it raised."""
    try:
        row["s"] = timed(jax.jit(fn), *args, iters=iters)
        row["gbps"] = kv_bytes / row["s"] / 1e9
        log(f"{label}: {row['s'] * 1e6:.1f} us, {row['gbps']:.0f} GB/s of KV")
    except Exception as e:  # recorded in the table: one failing kernel does not end the suite
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        log(f"{label}: {row['error']}")
    return row


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


# ----------------------------------------------------------------- correctness
def correctness(dry: bool, interpret) -> list[dict]:
    rng = np.random.default_rng(int(time.time()))
    rows = []
    cases = [  # B, T, S, Hq, Hkv, D, causal, segments, dtype
        (1, 40, 40, 4, 2, 64, True, 2, jnp.float32),
        (1, 33, 50, 8, 1, 64, True, 0, jnp.bfloat16),
    ] if dry else [
        (2, 1000, 1000, 32, 8, 128, True, 0, jnp.bfloat16),
        (1, 777, 1300, 16, 2, 64, True, 0, jnp.bfloat16),
        (2, 1024, 1024, 8, 8, 128, False, 3, jnp.float32),
        (1, 512, 512, 32, 8, 256, True, 2, jnp.bfloat16),
    ]
    for B, T, S, Hq, Hkv, D, causal, segments, dtype in cases:
        q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
                   for s in ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))
        seg = None
        if segments:
            cuts = np.sort(rng.integers(1, T, (B, segments - 1)), axis=1)
            seg = jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1), jnp.int32)
        do = jnp.asarray(rng.standard_normal((B, T, Hq, D)), jnp.float32).astype(dtype)
        fa = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg, interpret=interpret),
            q, k, v)[1](do))
        ref = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda q, k, v: reference_attention(q, k, v, causal=causal, segment_ids=seg), q, k, v)[1](do))
        out = flash_attention(q, k, v, causal=causal, segment_ids=seg, interpret=interpret)
        want = reference_attention(q, k, v, causal=causal, segment_ids=seg)
        grads = fa(q, k, v, do)
        want_g = ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), do.astype(jnp.float32))
        tol = 1e-4 if dtype == jnp.float32 else 2e-2
        errs = [rel(out, want)] + [rel(g, w) for g, w in zip(grads, want_g)]
        ok = max(errs) <= tol
        rows.append(dict(kernel="flash", shape=[B, T, S, Hq, Hkv, D], causal=causal, segments=segments,
                         dtype=jnp.dtype(dtype).name, errors=errs, ok=ok))
        log(f"correctness flash B{B} T{T} S{S} Hq{Hq} Hkv{Hkv} D{D} causal={causal} seg={segments} "
            f"{jnp.dtype(dtype).name}: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} "
            f"{'OK' if ok else 'FAIL'}")
    for B, S, Hq, Hkv, D, dtype in ([(3, 300, 8, 2, 64, jnp.float32)] if dry else
                                    [(3, 40000, 32, 8, 128, jnp.bfloat16), (2, 5000, 16, 2, 64, jnp.float32)]):
        q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32).astype(dtype)
        kc, vc = (jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.float32).astype(dtype) for _ in range(2))
        lengths = jnp.asarray([1, S // 2 + 7, S][:B], jnp.int32)
        got = decode_attention(q, kc, vc, lengths, interpret=interpret)
        err = rel(got, reference_decode(q, kc, vc, lengths))
        ok = err <= (1e-4 if dtype == jnp.float32 else 2e-2)
        rows.append(dict(kernel="decode", shape=[B, S, Hq, Hkv, D], dtype=jnp.dtype(dtype).name, errors=[err], ok=ok))
        log(f"correctness decode B{B} S{S} Hq{Hq} Hkv{Hkv} D{D} {jnp.dtype(dtype).name}: {err:.1e} "
            f"{'OK' if ok else 'FAIL'}")
    rows.append(ring_merge_correctness(rng, dry, interpret))
    rows += in_place_correctness(rng, dry, interpret)
    return rows


def paged_pool(rng, B, S, Hkv, D, page, dtype, int8):
    """``B`` rows of ``S`` tokens in a shuffled pool of pages (page 0 the null page) -> (KVView, lengths)."""
    n = -(-S // page)
    P = 1 + B * n
    table = jnp.asarray(rng.permutation(np.arange(1, P)).reshape(B, n), jnp.int32)
    k, v = (jnp.asarray(rng.standard_normal((P, page, Hkv, D)), jnp.float32).astype(dtype) for _ in range(2))
    if int8:
        (k, ks), (v, vs) = quantize(k), quantize(v)
        return KVView(k, v, ks, vs, table)
    return KVView(k, v, block_table=table)


def in_place_correctness(rng, dry: bool, interpret) -> list[dict]:
    """The caches read in place: contiguous int8 decode and paged decode (bf16 and int8 pools),
    against the float32 reference over the gathered, dequantized cache."""
    rows = []
    B, S, Hq, Hkv, D = (3, 200, 8, 2, 64) if dry else (4, 20000, 32, 8, 128)
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([1, S // 2 + 7, S - 3, S][:B], jnp.int32)
    (kq, ks), (vq, vs) = (quantize(jnp.asarray(rng.standard_normal((B, S, Hkv, D)), jnp.bfloat16)) for _ in range(2))
    checks = [("int8 decode", KVView(kq, vq, ks, vs),
               lambda kv: decode_attention(q, kv.k, kv.v, lengths, k_scale=kv.k_scale, v_scale=kv.v_scale,
                                           interpret=interpret))]
    for int8 in (False, True):
        checks.append((f"paged decode {'int8' if int8 else 'bf16'}", paged_pool(rng, B, S, Hkv, D, 16, jnp.bfloat16, int8),
                       lambda kv: paged_decode_attention(q, kv.k, kv.v, kv.block_table, lengths, k_scale=kv.k_scale,
                                                         v_scale=kv.v_scale, interpret=interpret)))
    for name, kv, fn in checks:
        k, v = kv.dequantized(jnp.float32)
        err = rel(fn(kv), reference_decode(q, k, v, lengths))
        ok = err <= 2e-2
        rows.append(dict(kernel=name, shape=[B, S, Hq, Hkv, D], dtype="bfloat16", errors=[err], ok=ok))
        log(f"correctness {name} B{B} S{S} Hq{Hq} Hkv{Hkv} D{D} bfloat16: {err:.1e} {'OK' if ok else 'FAIL'}")
    return rows


def ring_merge_correctness(rng, dry: bool, interpret) -> dict:
    """Ring attention's step: causal attention over 4 key shards, each with the lse kernel at its
    offset, merged by log-sum-exp, equals full attention (output and gradients)."""
    B, T, Hq, Hkv, D, shards = (1, 64, 4, 2, 64, 4) if dry else (1, 4096, 32, 8, 128, 4)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                   for s in ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, Hq, D)))
    S = T // shards

    def ring(q, k, v):
        out = jnp.zeros((B, T, Hq, D), jnp.float32)
        lse = jnp.full((B, T, Hq), -jnp.inf, jnp.float32)
        for j in range(shards):
            o, l = flash_attention_with_lse(q, k[:, j * S:(j + 1) * S], v[:, j * S:(j + 1) * S], causal=True,
                                            q_offset=jnp.int32(-j * S), interpret=interpret)
            out, lse = merge_partials(out, lse, o, l)
        return out

    got, grads = jax.jit(lambda q, k, v: jax.vjp(ring, q, k, v))(q, k, v)[0], jax.jit(
        lambda q, k, v, do: jax.vjp(ring, q, k, v)[1](do))(q, k, v, do)
    want, want_g = jax.vjp(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v)
    errs = [rel(got, want)] + [rel(g, w) for g, w in zip(grads, want_g(do))]
    ok = max(errs) <= 1e-4
    log(f"correctness ring merge B{B} T{T} Hq{Hq} Hkv{Hkv} D{D} {shards} shards float32: out {errs[0]:.1e} "
        f"dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} {'OK' if ok else 'FAIL'}")
    return dict(kernel="ring", shape=[B, T, T, Hq, Hkv, D], dtype="float32", errors=errs, ok=ok)


# --------------------------------------------------------------------- timings
def flash_timings(dry: bool, interpret) -> list[dict]:
    Hq, Hkv, D = (4, 2, 64) if dry else (32, 8, 128)
    lengths = (64, 128) if dry else (2048, 8192, 32768)
    tokens = 128 if dry else 32768
    iters = 1 if dry else 10
    rows = []
    for T in lengths:
        B = max(1, tokens // T)
        key = jax.random.key(T)
        q = jax.random.normal(key, (B, T, Hq, D), jnp.bfloat16)
        k = jax.random.normal(jax.random.fold_in(key, 1), (B, T, Hkv, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.fold_in(key, 2), (B, T, Hkv, D), jnp.bfloat16)
        fwd_flops = 4 * B * Hq * T * T * D * 0.5          # causal: half the score matrix
        impls = {
            "jaxlm": lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=interpret),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        }
        if dry:
            impls = {"jaxlm": impls["jaxlm"], "xla": impls["xla"]}
        for name, fn in impls.items():
            row = dict(T=T, B=B, impl=name)
            try:
                f = jax.jit(fn)
                fb = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                row["fwd_s"] = timed(f, q, k, v, iters=iters)
                row["fwd_tflops"] = fwd_flops / row["fwd_s"] / 1e12
                row["fwdbwd_s"] = timed(fb, q, k, v, iters=iters)
                row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_s"] / 1e12  # backward = 2.5x forward
                log(f"flash T={T} B={B} {name}: fwd {row['fwd_s'] * 1e3:.2f} ms ({row['fwd_tflops']:.0f} TFLOP/s), "
                    f"fwd+bwd {row['fwdbwd_s'] * 1e3:.2f} ms ({row['fwdbwd_tflops']:.0f} TFLOP/s)")
            except Exception as e:  # e.g. XLA's T x T scores do not fit at 32K
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                log(f"flash T={T} B={B} {name}: {row['error']}")
            rows.append(row)
    return rows


def copy_bandwidth(dry: bool) -> float:
    n = (1 << 20) if dry else (1 << 30)                  # 4 GiB of float32 on the GPU
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x + 1)                         # reads n, writes n
    seconds = timed(f, x, iters=1 if dry else 20)
    return 2 * n * 4 / seconds


def decode_timings(dry: bool, interpret) -> list[dict]:
    Hq, Hkv, D = (4, 2, 64) if dry else (32, 8, 128)
    rows = []
    for S in ((256, 512) if dry else (32768, 131072)):
        for B in (1, 8):
            key = jax.random.key(S + B)
            q = jax.random.normal(key, (B, Hq, D), jnp.bfloat16)
            kc = jax.random.normal(jax.random.fold_in(key, 1), (B, S, Hkv, D), jnp.bfloat16)
            vc = jax.random.normal(jax.random.fold_in(key, 2), (B, S, Hkv, D), jnp.bfloat16)
            lengths = jnp.full((B,), S, jnp.int32)
            kv_bytes = 2 * B * S * Hkv * D * 2
            for name, fn in (("jaxlm", lambda *a: decode_attention(*a, interpret=interpret)),
                             ("xla", xla_decode_attention)):
                rows.append(kv_read_row(dict(S=S, B=B, impl=name), f"decode S={S} B={B} {name}", fn,
                                        (q, kc, vc, lengths), kv_bytes, iters=1 if dry else 50))
    return rows


def xla_gather(q, kv: KVView, lengths):
    return xla_decode_attention(q, kv.k, kv.v, lengths, k_scale=kv.k_scale, v_scale=kv.v_scale)


def paged_timings(dry: bool, interpret) -> list[dict]:
    """Decode over pages of 16 tokens (the engine's default): our paged kernel (bf16 and int8 pools),
    JAX's shipped GPU paged kernel (head-major pool, transposed outside the timing), the XLA gather path,
    and our contiguous kernel over the same tokens (the bound a pool should come close to)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged

    Hq, Hkv, D = (4, 2, 64) if dry else (32, 8, 128)
    rng = np.random.default_rng(0)
    rows = []
    for S in ((256,) if dry else (8192, 32768)):
        B = 2 if dry else 8
        q = jnp.asarray(rng.standard_normal((B, Hq, D)), jnp.bfloat16)
        lengths = jnp.full((B,), S, jnp.int32)
        for int8 in (False, True):
            kv = paged_pool(rng, B, S, Hkv, D, 16, jnp.bfloat16, int8)
            contiguous = kv.contiguous()
            kv_bytes = 2 * B * S * Hkv * (D + 4 if int8 else 2 * D)
            dtype = "int8" if int8 else "bf16"
            head_major = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)
            jk, jv, jks, jvs = (head_major(x) for x in (kv.k, kv.v, kv.k_scale, kv.v_scale))
            impls = {
                "jaxlm paged": lambda q, kv: paged_decode_attention(
                    q, kv.k, kv.v, kv.block_table, lengths, k_scale=kv.k_scale, v_scale=kv.v_scale,
                    interpret=interpret),
                "jax paged": lambda q, kv: jax_paged(
                    q * D ** -0.5, jk, jv, kv.block_table, lengths, jks, jvs, k_splits=16 if not dry else 4,
                    interpret=bool(interpret)),
                "xla gather": lambda q, kv: xla_gather(q, kv.contiguous(), lengths),
                "jaxlm contiguous": lambda q, kv: decode_attention(
                    q, contiguous.k, contiguous.v, lengths, k_scale=contiguous.k_scale, v_scale=contiguous.v_scale,
                    interpret=interpret),
            }
            for name, fn in impls.items():
                rows.append(kv_read_row(dict(S=S, B=B, impl=name, dtype=dtype), f"paged S={S} B={B} {dtype} {name}",
                                        fn, (q, kv), kv_bytes, iters=1 if dry else 20))
    return rows


def paged_table(paged, bandwidth) -> list[str]:
    impls = ("jaxlm paged", "jax paged", "xla gather", "jaxlm contiguous")
    lines = ["", "paged decode, pages of 16, Hq=32, Hkv=8, D=128 (GB/s of KV read as stored; int8 counts its scales)",
             f"{'S':>6} {'B':>3} {'pool':>4} | " + " ".join(f"{i:>16}" for i in impls)]
    by = {(r["S"], r["dtype"], r["impl"]): r for r in paged}
    for S, dtype in sorted({(r["S"], r["dtype"]) for r in paged}):
        cells = [by.get((S, dtype, i), {}).get("gbps") for i in impls]
        B = by[(S, dtype, impls[0])]["B"]
        lines.append(f"{S:>6} {B:>3} {dtype:>4} | " + " ".join(f"{c:16.0f}" if c else f"{'n/a':>16}" for c in cells))
    lines.append(f"(HBM copy bandwidth {bandwidth / 1e9:.0f} GB/s)")
    return lines


def table(flash, decode, bandwidth) -> str:
    lines = ["", "=== jaxlm GPU suite: summary ===",
             f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, HBM copy bandwidth "
             f"{bandwidth / 1e9:.0f} GB/s",
             "", "flash attention, bf16, causal, D=128, Hq=32, Hkv=8 (TFLOP/s, causal work counted as half)",
             f"{'T':>6} {'B':>3} | {'fwd jaxlm':>9} {'cudnn':>7} {'xla':>7} {'ratio':>6} | "
             f"{'f+b jaxlm':>9} {'cudnn':>7} {'xla':>7} {'ratio':>6}"]
    by = {(r["T"], r["impl"]): r for r in flash}
    for T in sorted({r["T"] for r in flash}):
        get = lambda impl, key: by.get((T, impl), {}).get(key)
        fmt = lambda x: f"{x:7.0f}" if x else "    n/a"
        j, c, x = (get(i, "fwd_tflops") for i in ("jaxlm", "cudnn", "xla"))
        jb, cb, xb = (get(i, "fwdbwd_tflops") for i in ("jaxlm", "cudnn", "xla"))
        ratio = lambda a, b: f"{a / b:5.2f}x" if a and b else "   n/a"
        lines.append(f"{T:>6} {by[(T, 'jaxlm')]['B']:>3} | {fmt(j):>9} {fmt(c)} {fmt(x)} {ratio(j, c):>6} | "
                     f"{fmt(jb):>9} {fmt(cb)} {fmt(xb)} {ratio(jb, cb):>6}")
    lines += ["", "decode attention, bf16, Hq=32, Hkv=8, D=128 (GB/s of KV read; % of copy bandwidth)",
              f"{'S':>7} {'B':>3} | {'jaxlm':>7} {'%':>5} | {'xla':>7} {'%':>5}"]
    dby = {(r["S"], r["B"], r["impl"]): r for r in decode}
    for S, B in sorted({(r["S"], r["B"]) for r in decode}):
        j, x = dby[(S, B, "jaxlm")].get("gbps"), dby[(S, B, "xla")].get("gbps")
        pct = lambda g: f"{100 * g / (bandwidth / 1e9):4.0f}%" if g else "  n/a"
        lines.append(f"{S:>7} {B:>3} | {j or 0:7.0f} {pct(j)} | {x or 0:7.0f} {pct(x)}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"))
    parser.add_argument("--dry-run", action="store_true", help="CPU: interpret mode at tiny sizes")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dry = args.dry_run
    interpret = True if dry else None
    if not dry and jax.default_backend() != "gpu":
        raise SystemExit(f"no GPU (backend {jax.default_backend()}); use --dry-run on CPU")
    log(f"devices: {jax.devices()}")
    results = {"dry_run": dry, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    try:
        results["correctness"] = correctness(dry, interpret)
        results["copy_bandwidth"] = copy_bandwidth(dry)
        results["flash"] = flash_timings(dry, interpret)
        results["decode"] = decode_timings(dry, interpret)
        results["paged"] = paged_timings(dry, interpret)
        summary = table(results["flash"], results["decode"], results["copy_bandwidth"])
        summary += "\n" + "\n".join(paged_table(results["paged"], results["copy_bandwidth"]))
    except Exception:
        log(traceback.format_exc())
        raise
    finally:
        with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.out, "gpu_suite.log"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    failed = [r for r in results["correctness"] if not r["ok"]]
    log(summary)
    log(f"correctness: {len(results['correctness']) - len(failed)}/{len(results['correctness'])} OK")
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU suite, part 2: a 7B-shaped InternLM2 at 32K, 128K and 200K tokens on one device.

    python benchmarks/gpu/long_context.py --out DIR          (on the GPU, from run_all.sh)
    python benchmarks/gpu/long_context.py --out DIR --dry-run (CPU: a 2-layer model, short lengths)

Random bfloat16 weights (32 layers, hidden 4096, 32 heads, 8 kv heads, mlp 14336,
dynamic NTK x2 as internlm2-chat-7b), created on the device. Chunked prefill
(Pallas flash kernel, chunk 8192); records time, peak device memory next to
the planner's estimate, and decode tokens/s at the longest context with the
share of HBM bandwidth that reading the weights plus the KV cache implies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.plan import plan_memory  # noqa: E402
from models import bench_config, copy_bandwidth, random_model  # noqa: E402


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--lengths", default=None)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    dry = args.dry_run
    os.makedirs(args.out, exist_ok=True)
    if dry:
        config = bench_config(True, rope_scaling={"type": "dynamic", "factor": 2.0})
        lengths, chunk, impl = [int(x) for x in (args.lengths or "512,1024").split(",")], 256, "xla"
    else:
        config = bench_config(False)
        lengths, chunk, impl = [int(x) for x in (args.lengths or "32768,131072,200000").split(",")], args.chunk, "pallas"
    longest = max(lengths)
    model = random_model(config, attention_impl=impl, max_context=longest + 256)
    weights = config.num_params() * 2
    rows = []
    log = lambda m: print(m, flush=True)
    log(f"device {jax.devices()[0].device_kind}; model {config.num_params() / 1e9:.2f}B params bf16; chunk {chunk}")
    for T in lengths:
        ids = np.random.default_rng(T).integers(3, config.vocab_size, (1, T))
        row = {"tokens": T}
        try:
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=1, prefill_chunk_size=chunk, eos_token_id=None)
            row["first_call_s"] = time.perf_counter() - t  # includes compilation
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=1, prefill_chunk_size=chunk, eos_token_id=None)
            row["prefill_s"] = time.perf_counter() - t
            row["prefill_tokens_per_s"] = T / row["prefill_s"]
            row["peak_bytes"] = peak_bytes()
            plan = plan_memory(config, batch=1, context=T + 16, dtype="bfloat16", chunk=chunk)
            row["planned_bytes"] = plan.total
            log(f"prefill {T} tokens: {row['prefill_s']:.1f}s ({row['prefill_tokens_per_s']:.0f} tok/s), peak "
                f"{(row['peak_bytes'] or 0) / 2**30:.1f} GiB, planner {plan.total / 2**30:.1f} GiB")
            if T == longest:
                n = args.decode_tokens
                model.generate(ids, max_new_tokens=n, prefill_chunk_size=chunk, eos_token_id=None)
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=n, prefill_chunk_size=chunk, eos_token_id=None)
                total = time.perf_counter() - t
                per_token = (total - row["prefill_s"]) / (n - 1)
                if per_token <= 0:   # the decode steps were lost in the prefill's noise (dry runs on a busy CPU)
                    raise RuntimeError(f"decode time below the prefill's noise ({total:.3f}s for {n} tokens)")
                kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * (T + n // 2)
                row["decode_tokens_per_s"] = 1 / per_token
                row["decode_bytes_per_token"] = weights + kv
                log(f"decode at {T} tokens: {1 / per_token:.1f} tok/s ({per_token * 1e3:.1f} ms/token), "
                    f"{(weights + kv) / per_token / 1e9:.0f} GB/s of weights + KV")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"{T} tokens: {row['error']}")
        rows.append(row)
    bandwidth = copy_bandwidth(dry)
    lines = ["", "=== long context (7B-shaped, bf16, one device) ===" if not dry else "=== long context (dry run) ===",
             f"HBM copy bandwidth {bandwidth / 1e9:.0f} GB/s",
             f"{'tokens':>8} | {'prefill s':>9} {'tok/s':>7} | {'peak GiB':>8} {'plan GiB':>8} | {'decode tok/s':>12} {'% BW':>6}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['tokens']:>8} | {r['error']}")
            continue
        dec = r.get("decode_tokens_per_s")
        pct = f"{100 * r['decode_bytes_per_token'] * dec / bandwidth:5.0f}%" if dec else "     -"
        lines.append(f"{r['tokens']:>8} | {r['prefill_s']:9.1f} {r['prefill_tokens_per_s']:7.0f} | "
                     f"{(r['peak_bytes'] or 0) / 2**30:8.1f} {r['planned_bytes'] / 2**30:8.1f} | "
                     f"{(f'{dec:.1f}' if dec else '-'):>12} {pct}")
    summary = "\n".join(lines)
    print(summary)
    with open(os.path.join(args.out, "long_context.json"), "w") as f:
        json.dump({"rows": rows, "copy_bandwidth": bandwidth, "dry_run": dry}, f, indent=1, default=str)
    with open(os.path.join(args.out, "long_context_summary.txt"), "w") as f:
        f.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

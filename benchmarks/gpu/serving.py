"""GPU suite, part 3: the serving engine on a 7B-shaped model, at concurrency 1, 16 and 64.

    python benchmarks/gpu/serving.py --out DIR            (on the GPU, from run_all.sh)
    python benchmarks/gpu/serving.py --out DIR --dry-run  (CPU: a 2-layer model, concurrency 1, 2, 4)

The engine is driven in-process (no HTTP: the server adds a thread hop, not
device time, and its start-up would spend the suite's minutes): for each
concurrency c, 2c requests (at least 8) with prompts of 64-256 random tokens
and 32 greedy output tokens (ignore_eos) are kept c at a time in flight.
Reported per level: output tokens/s, median and p99 time to first token,
median time per output token, and the most KV pages in use. Random bfloat16
weights, scanned layers (one layer body to compile), the model's default
attention (Pallas on GPU, whatever the plan picks for paged caches).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.assets import TINY_DIR  # noqa: E402
from jaxlm.serving.engine import Engine, EngineConfig, compile_count  # noqa: E402
from jaxlm.serving.params import SamplingParams  # noqa: E402
from jaxlm.tokenizer import InternLM2Tokenizer  # noqa: E402
from models import bench_config, random_model  # noqa: E402

# The real tokenizer for the 7B vocabulary (92,544 ids: the engine detokenizes every step, as
# a server does); the dry run's 1,024-id model uses the bundled tiny one.
SHARED = os.environ.get("JAXLM_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared"))
REAL_TOKENIZER = os.path.join(SHARED, "tokenizers", "internlm2")


def run_level(engine: Engine, requests, concurrency: int) -> dict:
    """Keeps ``concurrency`` requests in flight until all are done; per-request times from the host."""
    pending, added, first, done, tokens = deque(requests), {}, {}, {}, {}
    peak_pages, start = 0, time.perf_counter()
    for _ in range(100_000):                      # bounded: far more steps than the work needs
        while pending and len(added) - len(done) < concurrency:
            prompt, n = pending.popleft()
            rid = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            added[rid] = time.perf_counter()
        if not engine.has_work():
            break
        outs = engine.step()
        now = time.perf_counter()
        peak_pages = max(peak_pages, engine.pool.used())
        for out in outs:
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = now
            tokens[out.request_id] = out.completion_tokens
            if out.finished:
                done[out.request_id] = now
    duration = time.perf_counter() - start
    ttft = [first[r] - added[r] for r in done]
    tpot = [(done[r] - first[r]) / (tokens[r] - 1) for r in done if tokens[r] > 1]
    return {"concurrency": concurrency, "requests": len(done), "duration_s": duration,
            "output_tokens_per_s": sum(tokens.values()) / duration,
            "ttft_median_s": float(np.median(ttft)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_median_s": float(np.median(tpot)), "peak_kv_pages": peak_pages}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,16,64)")
    parser.add_argument("--tokenizer", default=None, help=f"default: {REAL_TOKENIZER} ($JAXLM_SHARED); dry run: "
                                                          f"the bundled tiny one")
    args = parser.parse_args()
    dry = args.dry_run
    os.makedirs(args.out, exist_ok=True)
    levels = [int(c) for c in (args.concurrency or ("1,2,4" if dry else "1,16,64")).split(",")]
    config = bench_config(dry)
    t = time.perf_counter()
    model = random_model(config, scan_layers=True)
    tokenizer = InternLM2Tokenizer.from_pretrained(args.tokenizer or (TINY_DIR if dry else REAL_TOKENIZER))
    # Few buckets, as warm-up compiles each (widths 1, 2, 4 pages; chunks 16, 64, 256 tokens).
    max_len, page = (256, 64) if dry else (512, 128)
    engine = Engine(model, tokenizer, EngineConfig(
        max_num_seqs=max(levels), max_model_len=max_len, page_size=page,
        num_pages=max(levels) * (max_len // page) + 1, max_num_batched_tokens=128 if dry else 256))
    programs = engine.warmup()
    warm_s, compiles = time.perf_counter() - t, compile_count()
    print(f"device {jax.devices()[0].device_kind}; {config.num_params() / 1e9:.2f}B params bf16; "
          f"{programs} programs warm in {warm_s:.0f}s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for c in levels:
        n = max(8, 2 * c)
        requests = [(rng.integers(3, config.vocab_size, int(rng.integers(64, 257))).tolist(), 32) for _ in range(n)]
        if dry:
            requests = [(p[:96], 8) for p, _ in requests]
        rows.append(run_level(engine, requests, c))
        r = rows[-1]
        print(f"concurrency {c}: {r['output_tokens_per_s']:.0f} tok/s, TTFT median {r['ttft_median_s'] * 1e3:.0f} ms, "
              f"TPOT median {r['tpot_median_s'] * 1e3:.1f} ms, peak KV pages {r['peak_kv_pages']}", flush=True)
    recompiles = compile_count() - compiles
    lines = ["", "=== serving engine (7B-shaped, bf16, one device) ===" if not dry else "=== serving (dry run) ===",
             f"warm-up {warm_s:.0f}s for {programs} programs; compilations after warm-up: {recompiles}",
             f"{'conc':>5} | {'out tok/s':>9} | {'TTFT med':>8} {'TTFT p99':>8} | {'TPOT med':>8} | {'KV pages':>8}"]
    for r in rows:
        lines.append(f"{r['concurrency']:>5} | {r['output_tokens_per_s']:9.0f} | {r['ttft_median_s'] * 1e3:6.0f}ms "
                     f"{r['ttft_p99_s'] * 1e3:6.0f}ms | {r['tpot_median_s'] * 1e3:6.1f}ms | {r['peak_kv_pages']:>8}")
    summary = "\n".join(lines)
    print(summary)
    with open(os.path.join(args.out, "serving.json"), "w") as f:
        json.dump({"rows": rows, "warmup_s": warm_s, "programs": programs, "recompiles": recompiles,
                   "dry_run": dry}, f, indent=1)
    with open(os.path.join(args.out, "serving_summary.txt"), "w") as f:
        f.write(summary + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

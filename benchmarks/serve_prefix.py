"""Prefix caching: time to first token with a shared system prompt, with the cache and without.

    python benchmarks/serve_prefix.py [--prefix-tokens 1000] [--requests 12] [--max-concurrency 1]

Every request is the same ``--prefix-tokens``-token system prompt followed by
its own question (32-64 tokens), as chat requests under one deployment's
system prompt are; 16 output tokens each. The same requests go to two
``jaxlm serve`` processes on the 217M model of ``cpu_vs_torch.py``, one with
``--enable-prefix-caching`` (the default) and one with
``--no-enable-prefix-caching``; the client and metrics are
``serve_load.py``'s. One warm-up request per server goes first (it also puts
the prefix in the cache, as the deployment's first user would). Target:
median TTFT with the cache at most 0.3x without.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bench_config, machine  # noqa: E402
from serve_load import free_port, jaxlm_serve_cmd, model_dir, run_load, start, stop  # noqa: E402


def shared_prefix_requests(n: int, prefix_tokens: int, vocab: int, seed: int = 0, out_len: int = 16):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1000, vocab - 1000, prefix_tokens).tolist()
    return [(prefix + rng.integers(1000, vocab - 1000, int(rng.integers(32, 65))).tolist(), out_len)
            for _ in range(n + 1)]          # the first is the warm-up


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-serve"))
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-concurrency", type=int, default=1)
    args = parser.parse_args()

    path = model_dir(args.workdir)
    requests = shared_prefix_requests(args.requests, args.prefix_tokens, bench_config().vocab_size)
    model = os.path.basename(path)
    results = {}
    for name, flag in (("prefix caching", "--enable-prefix-caching"), ("no prefix caching",
                                                                       "--no-enable-prefix-caching")):
        port = free_port()
        proc = start(jaxlm_serve_cmd(path, port, flag, "--max-num-seqs", "8", "--max-model-len",
                                     str(args.prefix_tokens + 128), "--page-size", "32", "--num-pages", "512",
                                     "--max-num-batched-tokens", "256"), port)
        try:
            url = f"http://127.0.0.1:{port}/v1/completions"
            asyncio.run(run_load(url, requests[:1], model=model))
            results[name] = asyncio.run(run_load(url, requests[1:], model=model, concurrency=args.max_concurrency))
        finally:
            stop(proc)

    print(f"\nprefix caching, 217.7M params float32, {args.requests} requests = a shared {args.prefix_tokens}-token "
          f"prefix + 32-64 own tokens, 16 output tokens, concurrency {args.max_concurrency}; CPU ({machine()})")
    print(f"{'jaxlm serve':<22} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} {'out tok/s':>9}")
    for name, r in results.items():
        print(f"{name:<22} {r['ttft_s']['median']:8.3f}s {r['ttft_s']['p99']:8.3f}s "
              f"{r['tpot_s']['median'] * 1e3:7.0f}ms {r['output_tokens_per_s']:9.1f}")
    ratio = results["prefix caching"]["ttft_s"]["median"] / results["no prefix caching"]["ttft_s"]["median"]
    print(f"median TTFT, cached / uncached: {ratio:.2f}x (target <= 0.3x)")


if __name__ == "__main__":
    main()

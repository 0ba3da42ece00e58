"""GPU suite, part: weight-only int8 / int4 decoding of a 7B-shaped InternLM2 against bfloat16.

    python benchmarks/gpu/quant_decode.py --out DIR          (on the GPU, from run_all.sh)
    python benchmarks/gpu/quant_decode.py --out DIR --dry-run (CPU: the suite's 2-layer stand-in)

Random weights made on the device (internlm2-chat-7b's shape), bfloat16
compute; the int8 / int4 models quantize the decoder's matrices (the
embedding and head stay bfloat16). Greedy decoding of a 128-token prompt at
batch 1 and 16: tokens/s from (64 new - 1 new) / 63 steps, the weight bytes
each step reads, and the share of the copy bandwidth that implies. On a GPU
the int -> bfloat16 conversion is fused into the matmul's operand read, so
decoding, which is bound by reading the weights, should run faster as the
weights shrink.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.plan import weight_bytes  # noqa: E402
from models import bench_config, copy_bandwidth, random_model  # noqa: E402

PROMPT = 128


def per_token_seconds(model, batch: int, new: int, vocab: int) -> float:
    ids = np.random.default_rng(batch).integers(3, vocab, (batch, PROMPT))
    run = lambda n: model.generate(ids, max_new_tokens=n, eos_token_id=None)
    run(new), run(1)   # compile both lengths
    best = []
    for n in (1, new):
        times = []
        for _ in range(2):
            t = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t)
        best.append(min(times))
    if best[1] <= best[0]:   # the decode steps were lost in the prefill's noise (dry runs on a busy CPU)
        raise RuntimeError(f"decode time below the prefill's noise ({best[1]:.3f}s for {new} tokens)")
    return (best[1] - best[0]) / (new - 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-suite-out"))
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    dry = args.dry_run
    os.makedirs(args.out, exist_ok=True)
    config = bench_config(dry)
    new = 8 if dry else args.new_tokens
    batches = (1, 16)
    rows = []
    print(f"device {jax.devices()[0].device_kind}; {config.num_params() / 1e9:.2f}B params", flush=True)
    for mode in (None, "int8", "int4"):
        name = mode or "bfloat16"
        try:
            model = random_model(config, quantize=mode)
            nbytes = weight_bytes(config, "bfloat16", mode) - config.vocab_size * config.hidden_size * 2  # one row of the table
            for batch in batches:
                s = per_token_seconds(model, batch, new, config.vocab_size)
                rows.append({"weights": name, "batch": batch, "tokens_per_s": batch / s, "ms_per_step": s * 1e3,
                             "weight_bytes": nbytes})
                print(f"{name} b={batch}: {batch / s:.1f} tok/s ({s * 1e3:.2f} ms/step)", flush=True)
        except Exception as e:
            rows.append({"weights": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"{name}: {rows[-1]['error']}", flush=True)
        model = None
        gc.collect()
    bandwidth = copy_bandwidth(dry)
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r.get("weights") == "bfloat16" and "error" not in r}
    lines = ["", "=== quantized decode (7B-shaped, bf16 compute, one device) ===" if not dry
             else "=== quantized decode (dry run) ===", f"copy bandwidth {bandwidth / 1e9:.0f} GB/s",
             f"{'weights':>9} {'batch':>5} | {'tok/s':>8} {'ms/step':>8} | {'vs bf16':>7} | {'GB read':>7} {'% BW':>5}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['weights']:>9} | {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        pct = 100 * r["weight_bytes"] / (r["ms_per_step"] / 1e3) / bandwidth
        lines.append(f"{r['weights']:>9} {r['batch']:>5} | {r['tokens_per_s']:8.1f} {r['ms_per_step']:8.2f} | "
                     f"{ratio:6.2f}x | {r['weight_bytes'] / 1e9:7.2f} {pct:4.0f}%")
    print("\n".join(lines))
    for name, text in (("quant_decode.json", json.dumps({"rows": rows, "copy_bandwidth": bandwidth,
                                                          "dry_run": dry}, indent=1)),
                       ("quant_decode_summary.txt", "\n".join(lines))):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

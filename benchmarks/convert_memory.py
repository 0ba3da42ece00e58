"""Converter throughput and peak host memory on a synthetic ~2 GB checkpoint.

    python benchmarks/convert_memory.py [--gb 2.0] [--shard-size 1GB]

Writes a random float32 InternLM2-shaped HF checkpoint in 1 GB shards, then
runs each converter in a fresh process and reports MB/s and the process's
peak RSS next to the checkpoint size and the "one shard plus one tensor"
bound the converters promise.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def peak_rss_child(cmd):
    """Runs cmd; returns (seconds, peak RSS of that child in MB)."""
    code = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
            "print(json.dumps({'rc': r.returncode, 's': dt, "
            "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return result["s"], result["rss"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from jaxlm.checkpoint.synthetic import write_hf_checkpoint
    from jaxlm.config import InternLM2Config
    from jaxlm.files import parse_size

    # InternLM2-shaped (1_8b widths) with a smaller vocabulary, so that, as in the
    # released models, the layers and not the embeddings make up the bulk.
    base = dict(vocab_size=16384, hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
                bias=False)
    probe = InternLM2Config(num_hidden_layers=1, **base)
    per_layer = (probe.num_params() - InternLM2Config(num_hidden_layers=2, **base).num_params()) * -1
    fixed = probe.num_params() - per_layer
    layers = max(1, int((args.gb * 1e9 / 4 - fixed) / per_layer))
    config = InternLM2Config(num_hidden_layers=layers, **base)
    shard = parse_size(args.shard_size)
    work = args.workdir or tempfile.mkdtemp(prefix="jaxlm-convbench-")
    hf, jx, back = (os.path.join(work, n) for n in ("hf", "jaxlm", "back"))
    try:
        t = time.perf_counter()
        write_hf_checkpoint(hf, config, dtype="float32", max_shard_bytes=shard)
        size_mb = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf)) / 1e6
        print(f"synthetic checkpoint: {layers} layers, {config.num_params() / 1e6:.0f}M params, "
              f"{size_mb:.0f} MB float32 in {args.shard_size} shards ({time.perf_counter() - t:.0f}s)")
        largest_tensor_mb = config.vocab_size * config.hidden_size * 4 / 1e6
        baseline_s, baseline_rss = peak_rss_child([sys.executable, "-c", "import jaxlm.checkpoint.convert"])
        rows = []
        for name, cmd in [
            ("hf_to_jaxlm", [sys.executable, "-m", "checkpoints_convert.hf_to_jaxlm", "--src", hf, "--dst", jx]),
            ("jaxlm_to_hf", [sys.executable, "-m", "checkpoints_convert.jaxlm_to_hf", "--src", jx, "--dst", back,
                             "--max-shard-size", args.shard_size]),
        ]:
            seconds, rss = peak_rss_child(cmd)
            rows.append((name, seconds, size_mb / seconds, rss, rss - baseline_rss))
        print(f"\nimport-only process peak RSS: {baseline_rss:.0f} MB; checkpoint {size_mb:.0f} MB; "
              f"shard {shard / 1e6:.0f} MB; largest tensor {largest_tensor_mb:.0f} MB")
        print(f"{'direction':<12} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12} {'above import':>13} "
              f"{'RSS / checkpoint':>17}")
        for name, s, mbps, rss, extra in rows:
            print(f"{name:<12} {s:8.1f} {mbps:8.0f} {rss:12.0f} {extra:13.0f} {rss / size_mb:17.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Prefill time and peak memory at 2K-32K tokens, chunked vs unchunked, on CPU.

    python benchmarks/long_context_cpu.py [--lengths 2048,4096,8192,16384,32768] [--chunk 2048]

The ~217M InternLM2-shaped model of the generation benchmark, float32, one
sequence; the prefill of `generate` (KV cache + last-position logits).
Memory is XLA's own buffer assignment for the compiled prefill (arguments +
outputs + temporaries), so it is per-program and deterministic; the growth
exponent is the slope of log(memory) and log(time) against log(length).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_config, machine, make_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-217m"))
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm import InternLM2ForCausalLM
    from jaxlm.runtime import engine
    from jaxlm.runtime.sampling import SamplerFlags

    config = bench_config(max_position_embeddings=32768)
    path = make_checkpoint(args.workdir, bench_config())
    model = InternLM2ForCausalLM.from_pretrained(path)
    model.config = config  # same weights; allow 32K positions
    graphdef, state = nnx.split(model)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for T in lengths:
        ids = np.random.default_rng(T).integers(3, config.vocab_size, (1, T)).astype(np.int32)
        lens = np.array([T], np.int32)
        row = {"T": T}
        for name, chunk in (("unchunked", None), ("chunked", args.chunk)):
            call = lambda: engine.prefill(graphdef, state, ids, lens, jnp.int32(T + 16), None, jnp.int32(0),
                                          jnp.zeros((1,), bool), cache_len=T + 16, cache_dtype=jnp.dtype("float32"),
                                          num_new=16, flags=SamplerFlags(), chunk=chunk)
            compiled = engine.prefill.lower(graphdef, state, ids, lens, jnp.int32(T + 16), None, jnp.int32(0),
                                            jnp.zeros((1,), bool), cache_len=T + 16,
                                            cache_dtype=jnp.dtype("float32"), num_new=16, flags=SamplerFlags(),
                                            chunk=chunk).compile()
            m = compiled.memory_analysis()
            row[name + "_mb"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                 + m.temp_size_in_bytes) / 2**20
            jax.block_until_ready(call())  # warm (compile cache)
            t = time.perf_counter()
            jax.block_until_ready(call()["logits"])
            row[name + "_s"] = time.perf_counter() - t
            print(f"T={T} {name}: {row[name + '_s']:.1f}s, {row[name + '_mb']:.0f} MiB", flush=True)
        rows.append(row)

    def slope(key):
        x, y = np.log([r["T"] for r in rows]), np.log([r[key] for r in rows])
        return float(np.polyfit(x, y, 1)[0])

    weights_mb = config.num_params() * 4 / 2**20
    print(f"\nprefill of one sequence, {config.num_params() / 1e6:.0f}M params float32 ({weights_mb:.0f} MiB of "
          f"weights, included below), chunk {args.chunk}; CPU ({machine()}), jax {jax.__version__}")
    print(f"{'tokens':>7} | {'unchunked s':>11} {'MiB':>7} | {'chunked s':>9} {'MiB':>7}")
    for r in rows:
        print(f"{r['T']:>7} | {r['unchunked_s']:11.1f} {r['unchunked_mb']:7.0f} | {r['chunked_s']:9.1f} "
              f"{r['chunked_mb']:7.0f}")
    print(f"growth exponents (log-log slope over {lengths[0]}-{lengths[-1]}): time unchunked "
          f"{slope('unchunked_s'):.2f}, chunked {slope('chunked_s'):.2f}; memory unchunked "
          f"{slope('unchunked_mb'):.2f}, chunked {slope('chunked_mb'):.2f}")
    above = lambda key: [r[key] - weights_mb for r in rows]
    xs = np.log([r["T"] for r in rows])
    print("memory above the weights: exponents unchunked "
          f"{np.polyfit(xs, np.log(above('unchunked_mb')), 1)[0]:.2f}, chunked "
          f"{np.polyfit(xs, np.log(above('chunked_mb')), 1)[0]:.2f}")


if __name__ == "__main__":
    main()

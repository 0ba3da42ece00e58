"""Context-parallel prefill: ring attention against all-gather of K/V, on 8 simulated devices.

    python benchmarks/context_parallel.py [--lengths 4096,8192,16384] [--chunk 2048]

The prefill of `generate` (KV cache + last-position logits) on a ``context=8``
mesh, one sequence, float32, unchunked and chunked, for the strategies of
`jaxlm.nn.context_parallel`: ``ring``, ``allgather`` (explicit, in shard_map)
and ``xla`` (the layout left to XLA's partitioner, what training uses). For each it reports XLA's per-device memory for the
compiled program (arguments + outputs + temporaries), the collectives in the
compiled HLO with their bytes per device, and the wall time. It first checks
that all strategies give the same logits.

Simulated devices share one CPU and its memory, so the time shows the
compute each strategy does (its causal skipping, its extra merges), not
interconnect speed; memory and bytes moved are what a real mesh would see.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from collectives import collectives  # noqa: E402
from common import bench_config, machine, make_checkpoint  # noqa: E402

# Small enough that a 16K prefill takes seconds on 2 cores; attention dominates at these lengths.
SHAPE = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, max_position_embeddings=65536)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-cp"))
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm import InternLM2ForCausalLM
    from jaxlm.runtime import engine
    from jaxlm.runtime.sampling import SamplerFlags
    from jaxlm.sharding import make_mesh, named_sharding

    config = bench_config(**SHAPE)
    path = make_checkpoint(args.workdir, config)
    mesh = make_mesh("context=8")
    models = {s: InternLM2ForCausalLM.from_pretrained(path, mesh=mesh, context_attention=s)
              for s in ("xla", "allgather", "ring")}
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        ids = np.random.default_rng(T).integers(3, config.vocab_size, (1, T)).astype(np.int32)
        ids, lens = (jax.device_put(x, named_sharding(mesh, ("act_batch",) + (None,) * (x.ndim - 1)))
                     for x in (ids, np.array([T], np.int32)))
        for chunk in (None, args.chunk):
            logits = {}
            for strategy, model in models.items():
                graphdef, state = nnx.split(model)
                call_args = (graphdef, state, ids, lens, jnp.int32(T), None, jnp.int32(0), jnp.zeros((1,), bool))
                kw = dict(cache_len=T, cache_dtype=jnp.dtype("float32"), num_new=16, flags=SamplerFlags(),
                          chunk=chunk)
                with jax.set_mesh(mesh):
                    compiled = engine.prefill.lower(*call_args, **kw).compile()
                    m = compiled.memory_analysis()
                    counts, nbytes = collectives(compiled.as_text())
                    logits[strategy] = np.asarray(engine.prefill(*call_args, **kw)["logits"])  # warm
                    t = time.perf_counter()
                    jax.block_until_ready(engine.prefill(*call_args, **kw)["logits"])
                    seconds = time.perf_counter() - t
                mib = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                       + m.temp_size_in_bytes) / 2**20
                moved = ", ".join(f"{counts[k]} {k} {nbytes[k] / 2**20:.1f} MiB" for k in sorted(counts))
                rows.append(dict(T=T, chunk=chunk, strategy=strategy, s=seconds, mib=mib,
                                 temp=m.temp_size_in_bytes / 2**20, moved=moved))
                print(f"T={T} chunk={chunk} {strategy}: {seconds:.2f}s, {mib:.0f} MiB/device "
                      f"(temp {rows[-1]['temp']:.0f}); {moved}", flush=True)
            for other in ("xla", "allgather"):
                err = np.abs(logits[other] - logits["ring"]).max()
                assert err < 1e-3, f"T={T} chunk={chunk}: ring and {other} disagree by {err}"

    names = list(models)
    print(f"\ncontext-parallel prefill, context=8 (simulated on CPU: {machine()}), jax {jax.__version__}; "
          f"{config.num_params() / 1e6:.0f}M params float32, one sequence; logits agree across strategies")
    print(f"{'tokens':>6} {'chunk':>6} | " + " | ".join(f"{n + ' s':>11} {'MiB/dev':>7}" for n in names)
          + f" | {'ring/allgather: time':>20} {'temp mem':>8}")
    by = {(r["T"], r["chunk"], r["strategy"]): r for r in rows}
    for T, chunk in dict.fromkeys((r["T"], r["chunk"]) for r in rows):
        cells = [by[T, chunk, n] for n in names]
        a, b = by[T, chunk, "allgather"], by[T, chunk, "ring"]
        print(f"{T:>6} {str(chunk or '-'):>6} | " + " | ".join(f"{c['s']:11.2f} {c['mib']:7.0f}" for c in cells)
              + f" | {b['s'] / a['s']:20.2f} {b['temp'] / a['temp']:8.2f}")
    print("collectives in the compiled program (static ops; those inside loops run once per iteration):")
    for r in rows:
        print(f"  T={r['T']} chunk={r['chunk'] or '-'} {r['strategy']}: {r['moved']}")


if __name__ == "__main__":
    main()

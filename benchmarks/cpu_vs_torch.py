"""jaxlm vs PyTorch transformers on CPU: greedy decoding and prefill, side by side.

    python benchmarks/cpu_vs_torch.py [--workdir DIR] [--repeats 3]

Model: InternLM2-shaped, ~217M params (hidden 768, 12 layers, 12 heads, 4 kv
heads, intermediate 2048, vocab 92544), random float32 weights in HF layout.
Peer: transformers' LlamaForCausalLM on the same weights (wqkv split per kv
group; w1/w3/w2 as gate/up/down). Work: greedy decoding of a 128-token
prompt + 64 new tokens at batch 1 and 8, and a 1x512 prefill forward.
Per-token decode time is (time for 64 new - time for 1 new) / 63, so prefill
is excluded. Prints ratios (torch time / jaxlm time; > 1 means jaxlm is
faster), the memory-bandwidth floor of batch-1 decoding, and how many greedy
tokens the two agree on.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_config, best_of, copy_bandwidth, llama_twin, machine, make_checkpoint  # noqa: E402

PROMPT, NEW = 128, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-217m"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from jaxlm import InternLM2ForCausalLM

    config = bench_config()
    path = make_checkpoint(args.workdir, config)
    jx = InternLM2ForCausalLM.from_pretrained(path)
    pt = llama_twin(path, config)
    rng = np.random.default_rng(0)
    rows = []

    def jx_generate(ids, n):
        return jx.generate(ids, max_new_tokens=n, eos_token_id=None)

    def pt_generate(ids, n):
        with torch.no_grad():
            return pt.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                               max_new_tokens=n, min_new_tokens=n, do_sample=False).numpy()

    agreement = {}
    for batch in (1, 8):
        ids = rng.integers(3, config.vocab_size, (batch, PROMPT))
        times = {}
        for name, fn in (("jaxlm", jx_generate), ("torch", pt_generate)):
            out = fn(ids, NEW)  # warm-up (and compile)
            fn(ids, 1)
            t1 = best_of(lambda: fn(ids, 1), args.repeats)
            tn = best_of(lambda: fn(ids, NEW), args.repeats)
            times[name] = (tn - t1) / (NEW - 1)
            agreement.setdefault(batch, {})[name] = out[:, PROMPT:]
        rows.append((f"decode b={batch} (ms/step)", times["torch"] * 1e3, times["jaxlm"] * 1e3))

    x = rng.integers(3, config.vocab_size, (1, 512))
    np.asarray(jx(x))
    t_jx = best_of(lambda: np.asarray(jx(x)), args.repeats)
    with torch.no_grad():
        pt(torch.from_numpy(x))
        t_pt = best_of(lambda: pt(torch.from_numpy(x)).logits.numpy(), args.repeats)
    rows.append(("prefill 1x512 (ms)", t_pt * 1e3, t_jx * 1e3))

    # Batch-1 decoding must read every weight once per token; the embedding
    # table is the exception (one row). Copy bandwidth counts read + write.
    weight_bytes = (config.num_params() - (config.vocab_size - 1) * config.hidden_size) * 4
    bandwidth = 2 * copy_bandwidth()
    floor_ms = weight_bytes / bandwidth * 1e3

    print(f"\njaxlm vs PyTorch {torch.__version__} on CPU ({machine()}, torch threads {torch.get_num_threads()})")
    print(f"model: {config.num_params() / 1e6:.1f}M params, float32; prompt {PROMPT}, {NEW} new tokens\n")
    print(f"{'work':<26} {'torch':>10} {'jaxlm':>10} {'speedup':>9}")
    for name, t, j in rows:
        print(f"{name:<26} {t:10.1f} {j:10.1f} {t / j:8.2f}x")
    b1 = rows[0][2]
    print(f"\nbatch-1 floor: {weight_bytes / 1e6:.0f} MB of weights per token / {bandwidth / 1e9:.1f} GB/s "
          f"copy bandwidth (read + write) = {floor_ms:.1f} ms; jaxlm at {b1:.1f} ms = {floor_ms / b1:.0%} "
          f"of the floor's speed")
    for batch, outs in agreement.items():
        same = outs["jaxlm"] == outs["torch"]
        prefix = [int(np.argmin(r)) if not r.all() else r.size for r in same]
        print(f"greedy agreement b={batch}: {same.sum()}/{same.size} tokens equal; "
              f"rows agree for the first {min(prefix)}..{max(prefix)} tokens")


if __name__ == "__main__":
    main()

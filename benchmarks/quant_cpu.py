"""Weight-only int8 / int4 decoding on CPU, side by side with PyTorch float32 and PyTorch int8.

    python benchmarks/quant_cpu.py [--workdir DIR] [--repeats 3]

Model: the ~217M InternLM2 shape of `cpu_vs_torch.py`, random float32 weights
at std 0.02 (InternLM2's initializer range, so int8 rounding does not change
the greedy path at once). Work: greedy batch-1 decoding, 128-token prompt +
64 new tokens; ms/token = (time for 64 new - time for 1 new) / 63. Runs:

- PyTorch float32 (transformers' LlamaForCausalLM on the same weights);
- PyTorch int8: ``torch.ao.quantization.quantize_dynamic`` on every Linear
  (output head included): int8 weights, activations quantized on the fly,
  fbgemm int8 GEMMs; the CPU peer for int8;
- jaxlm float32, int8 and int4, the output head quantized too (as PyTorch's).

The repeats alternate between the runs (A/B/C...), so a load change on the
shared machine hits all of them. Prints ms/token, ratios, teacher-forced greedy
agreement with float32 (each position given the float32 greedy context) and
the memory-bandwidth floor of each: the bytes of weights a token reads over
the copy bandwidth.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_config, copy_bandwidth, llama_twin, machine, make_checkpoint  # noqa: E402

PROMPT, NEW = 128, 64


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-217m-std002"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from jaxlm import InternLM2ForCausalLM
    from jaxlm.plan import weight_bytes

    config = bench_config(initializer_range=0.005)   # synthetic weights are drawn at 4x the range: std 0.02
    path = make_checkpoint(args.workdir, config)
    pt32 = llama_twin(path, config)
    pt8 = torch.ao.quantization.quantize_dynamic(llama_twin(path, config), {torch.nn.Linear}, dtype=torch.qint8)
    jx = {name: InternLM2ForCausalLM.from_pretrained(path, quantize=mode, quantize_output=mode is not None)
          for name, mode in (("jaxlm float32", None), ("jaxlm int8", "int8"), ("jaxlm int4", "int4"))}
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, PROMPT))

    def torch_run(model):
        def gen(n):
            with torch.no_grad():
                x = torch.from_numpy(ids)
                return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False).numpy()
        return gen

    runs = {"torch float32": torch_run(pt32), "torch int8": torch_run(pt8)}
    runs.update({name: (lambda m: lambda n: np.asarray(m.generate(ids, max_new_tokens=n, eos_token_id=None)))(m)
                 for name, m in jx.items()})
    outs = {}
    for name, fn in runs.items():   # warm-up and compile
        outs[name] = fn(NEW)
        fn(1)
    best = {name: [np.inf, np.inf] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            for k, n in enumerate((1, NEW)):
                t = time.perf_counter()
                fn(n)
                best[name][k] = min(best[name][k], time.perf_counter() - t)
    ms = {name: (b[1] - b[0]) / (NEW - 1) * 1e3 for name, b in best.items()}

    # teacher-forced greedy agreement: every run scores the float32 greedy sequence
    reference = outs["jaxlm float32"]
    target = reference[0, PROMPT:]
    agree = {}
    for name in runs:
        if name.startswith("torch"):
            with torch.no_grad():
                logits = (pt32 if name == "torch float32" else pt8)(torch.from_numpy(reference)).logits.numpy()
        else:
            logits = np.asarray(jx[name](reference))
        agree[name] = float((logits[0, PROMPT - 1:-1].argmax(-1) == target).mean())

    bandwidth = 2 * copy_bandwidth()   # read + write
    table = config.vocab_size * config.hidden_size
    nbytes = {"torch float32": weight_bytes(config, "float32") - 4 * (table - config.hidden_size),
              "torch int8": weight_bytes(config, "float32", "int8", True) - 4 * (table - config.hidden_size)}
    for name, mode in (("jaxlm float32", None), ("jaxlm int8", "int8"), ("jaxlm int4", "int4")):
        nbytes[name] = weight_bytes(config, "float32", mode, mode is not None) - 4 * (table - config.hidden_size)

    print(f"\nquantized decoding on CPU ({machine()}, torch {torch.__version__}, threads {torch.get_num_threads()})")
    print(f"model: {config.num_params() / 1e6:.1f}M params, weights std 0.02; batch 1, prompt {PROMPT}, {NEW} new "
          f"tokens; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)\n")
    print(f"{'run':<15} {'ms/token':>9} {'vs torch f32':>12} {'vs torch int8':>13} {'vs jaxlm f32':>12} "
          f"{'agree':>6} {'MB/token':>8} {'floor ms':>8}")
    for name in runs:
        floor = nbytes[name] / bandwidth * 1e3
        print(f"{name:<15} {ms[name]:9.1f} {ms['torch float32'] / ms[name]:11.2f}x "
              f"{ms['torch int8'] / ms[name]:12.2f}x {ms['jaxlm float32'] / ms[name]:11.2f}x "
              f"{agree[name]:6.0%} {nbytes[name] / 1e6:8.0f} {floor:8.1f}")
    targets = [("jaxlm int8 >= 1.0x torch int8", ms["torch int8"] / ms["jaxlm int8"], 1.0),
               ("jaxlm int8 >= 1.3x jaxlm float32", ms["jaxlm float32"] / ms["jaxlm int8"], 1.3),
               ("jaxlm int8 >= 1.8x torch float32", ms["torch float32"] / ms["jaxlm int8"], 1.8),
               ("jaxlm int4 >= 1.0x jaxlm float32", ms["jaxlm float32"] / ms["jaxlm int4"], 1.0)]
    print()
    for what, got, want in targets:
        print(f"target {what}: {got:.2f}x {'met' if got >= want else f'missed by {want / got:.2f}x'}")


if __name__ == "__main__":
    main()

"""jaxlm's training step vs PyTorch transformers on CPU, same weights, batch and AdamW.

    python benchmarks/train_vs_torch.py [--batch 4] [--steps 4]

Model: the ~217M InternLM2-shaped model of the generation benchmark, float32,
sequence length 512. Peer: transformers' LlamaForCausalLM on the same weights
with torch.optim.AdamW (same learning rate, betas, eps, weight decay, global
norm clipping). Prints ms/step side by side, the ratio, and MFU against the
machine's measured float32 matmul throughput.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_config, llama_twin, machine, make_checkpoint  # noqa: E402

SEQ = 512
LR, BETAS, EPS, WD, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-217m"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    args = parser.parse_args()

    import jax
    import torch
    from flax import nnx

    from jaxlm import InternLM2ForCausalLM
    from jaxlm.train.metrics import flops_per_token, peak_flops_per_device
    from jaxlm.train.step import OptimizerConfig, make_optimizer, train_step

    config = bench_config()
    path = make_checkpoint(args.workdir, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (args.batch, SEQ + 1))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": np.ones((args.batch, SEQ), np.float32)}

    # jaxlm: the trainer's train step (AdamW, clipping); unrolled layers, which run
    # ~3% faster than scanned ones on CPU (scanning saves memory, not time, here)
    model = InternLM2ForCausalLM.from_pretrained(path, scan_layers=False)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(OptimizerConfig(learning_rate=LR, warmup_steps=1, total_steps=10_000, min_lr_ratio=1.0,
                                         weight_decay=WD, b1=BETAS[0], b2=BETAS[1], eps=EPS, clip_norm=CLIP))
    state = opt.init(params)
    jax_losses, jax_times = [], []
    for i in range(args.steps + 2):
        t = time.perf_counter()
        params, state, m = train_step(graphdef, params, rest, state, batch, optimizer=opt)
        jax_losses.append(float(m["loss"]))
        jax_times.append(time.perf_counter() - t)

    # PyTorch transformers
    llama = llama_twin(path, config).train()
    optimizer = torch.optim.AdamW(llama.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
    torch_losses, torch_times = [], []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        logits = llama(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llama.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch_losses.append(float(loss))
        torch_times.append(time.perf_counter() - t)

    # the first two jaxlm steps compile (the second sees committed, donated state)
    jt, tt = np.median(jax_times[2:]), np.median(torch_times[1:])
    flops = flops_per_token(config, SEQ, lora=False) * args.batch * SEQ
    peak = peak_flops_per_device()
    print(f"\ntraining step, {config.num_params() / 1e6:.1f}M params, batch {args.batch} x {SEQ} tokens, float32, "
          f"AdamW; CPU ({machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'':<10} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6}")
    for name, t in (("torch", tt), ("jaxlm", jt)):
        print(f"{name:<10} {t * 1e3:9.0f} {args.batch * SEQ / t:9.0f} {flops / t / peak:6.1%}")
    print(f"speedup (torch / jaxlm): {tt / jt:.2f}x; MFU relative to a measured {peak / 1e9:.0f} GFLOP/s "
          f"float32 matmul")
    print(f"first-step loss: torch {torch_losses[0]:.4f}, jaxlm {jax_losses[0]:.4f} (same weights and batch)")


if __name__ == "__main__":
    main()

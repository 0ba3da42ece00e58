"""Training metrics: FLOPs per token, MFU, and where they are written.

``metrics.jsonl`` gets one JSON object per log step; TensorBoard event files
(tensorboardX, no TensorFlow needed) get the same scalars.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per device (chip or GPU), from the vendors' spec sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100": 312e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA B200": 2250e12,
}


@functools.lru_cache(maxsize=1)
def peak_flops_per_device() -> float:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    # CPU (or unknown): measure a float32 matmul once; MFU is then relative to it.
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 2 * n**3 * 5 / (time.perf_counter() - t)


def flops_per_token(config, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token: 6N (2N forward, 4N backward) + causal attention.

    With LoRA the base weights get no gradient: 4N instead of 6N. N counts the
    matmul weights (the embedding lookup is not a matmul).
    """
    n = config.num_params() - config.vocab_size * config.hidden_size * (0 if config.tie_word_embeddings else 1)
    attention = 6 * config.num_hidden_layers * seq_len * config.hidden_size  # QK^T and PV, causal half, x3
    return (4 if lora else 6) * n + attention


class MetricsWriter:
    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        if os.path.exists(self.path):  # a resumed run rewrites the steps after its checkpoint
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # metrics.jsonl still has everything
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.enabled and self.tb is not None:
            self.tb.close()

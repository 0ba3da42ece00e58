"""What the GPU suite's model parts share: a 7B-shaped InternLM2 with random weights made
on the device (nothing to download or convert), and the device's copy bandwidth."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import InternLM2ForCausalLM
from jaxlm.config import InternLM2Config

# The dry runs' stand-in for the 7B shape: small enough for interpret mode on CPU.
DRY_CONFIG = dict(vocab_size=512,   # the bundled tiny tokenizer's vocabulary
                  hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def bench_config(dry: bool, **overrides) -> InternLM2Config:
    """internlm2-chat-7b's shape on the GPU; `DRY_CONFIG` in a dry run."""
    if dry:
        return InternLM2Config(**{**DRY_CONFIG, **overrides})
    base = InternLM2Config.from_pretrained("internlm2-chat-7b")
    return base.replace(**overrides) if overrides else base


def random_model(config: InternLM2Config, **options) -> InternLM2ForCausalLM:
    """bfloat16 random weights initialised by one compiled call on the device (a host-side
    init of 7B parameters would take minutes and twice the memory)."""
    options = {"dtype": "bfloat16", "param_dtype": "bfloat16", **options}
    build = lambda: InternLM2ForCausalLM(config, rngs=nnx.Rngs(0), **options)
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())


def copy_bandwidth(dry: bool) -> float:
    """Bytes per second of a read-plus-write pass over 4 GiB (dry: 4 MiB)."""
    n = (1 << 20) if dry else (1 << 30)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    f(x).block_until_ready()
    reps = 3 if dry else 20
    t = time.perf_counter()
    for _ in range(reps):
        f(x).block_until_ready()
    return 2 * n * 4 * reps / (time.perf_counter() - t)

"""Rotary position embeddings (rotate-half form) with linear and dynamic-NTK scaling.

Everything is computed in float32 exactly as the reference PyTorch code does
(``inv_freq`` from an int64 arange cast to float32, ``freqs = inv_freq * pos``)
and only the final cos/sin are cast to the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int
    theta: float
    scaling_type: str | None = None  # None | "linear" | "dynamic"
    factor: float = 1.0
    max_position_embeddings: int = 2048


def dynamic_ntk_base(rope: RopeConfig, seq_len) -> jax.Array:
    """The rotary base for a call that covers ``seq_len`` positions.

    For dynamic NTK, when ``seq_len > max_position_embeddings`` the base grows as
    ``base * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2))``;
    otherwise (and for other scaling types) it is the configured theta.
    ``seq_len`` may be a traced value.
    """
    base = jnp.float32(rope.theta)
    if rope.scaling_type != "dynamic":
        return base
    d = rope.head_dim
    seq_len = jnp.asarray(seq_len, jnp.float32)
    scaled = base * ((jnp.float32(rope.factor) * seq_len / jnp.float32(rope.max_position_embeddings))
                     - jnp.float32(rope.factor - 1)) ** jnp.float32(d / (d - 2))
    return jnp.where(seq_len > rope.max_position_embeddings, scaled, base)


def inv_frequencies(head_dim: int, base) -> jax.Array:
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / jnp.float32(head_dim)
    return 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, base, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape ``[B, T, head_dim]`` for integer ``positions [B, T]``.

    ``base`` is one value, or one per row ``[B]`` (rows of different lengths
    under dynamic NTK, as the serving engine batches them).
    """
    pos = positions.astype(jnp.float32)
    if rope.scaling_type == "linear":
        pos = pos / jnp.float32(rope.factor)
    base = jnp.asarray(base, jnp.float32)
    base = base.reshape(base.shape + (1, 1)) if base.ndim else base
    freqs = pos[..., None] * inv_frequencies(rope.head_dim, base)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                 # [B, T, D]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, ..., D]`` by cos/sin ``[B, T, D]`` (rotate-half form)."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin

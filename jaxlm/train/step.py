"""The training step: loss over target tokens, gradient accumulation, AdamW.

The loss is the sum of token cross-entropies divided by the number of target
tokens of the whole global batch, so it (and its gradient) is the same however
the batch is split into micro-batches. Micro-batches run under ``lax.scan``,
summing gradients; the division happens once at the end.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5
    warmup_steps: int = 10
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    warmup = max(1, min(cfg.warmup_steps, cfg.total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(cfg.total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(params) -> object:
    """Weight decay on matrices (kernels, embeddings, LoRA factors), not on norms or biases."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity(),
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy in float32, ``[B, T]``."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]


LOSS_CHUNK = 1024


def chunked_loss_sum(model, hidden, targets, weights, chunk: int = LOSS_CHUNK):
    """Sum of weighted token losses, computing the float32 logits ``chunk`` tokens at a time.

    Each chunk is rematerialized in the backward pass, so at most one chunk's
    ``[B, chunk, V]`` logits are alive: with InternLM2's 92544-token
    vocabulary, full logits at 8K tokens would be 3 GB per sequence.
    """
    T = hidden.shape[1]
    if T <= chunk:
        return jnp.sum(token_losses(model.logits(hidden), targets) * weights)
    pad = -T % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = hidden.shape[1] // chunk
    split = lambda x: jnp.moveaxis(x.reshape((x.shape[0], n, chunk) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(h, t, w):
        return jnp.sum(token_losses(model.logits(h), t) * w)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (split(hidden), split(targets), split(weights)))
    return total


def batch_loss_sum(model, batch, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights) for one (micro-)batch.

    ``batch``: input_ids, targets, loss_weights ``[B, T]``; optional
    position_ids and segment_ids for packed rows.
    """
    hidden = model.hidden_states(batch["input_ids"], position_ids=batch.get("position_ids"),
                                 segment_ids=batch.get("segment_ids"), dropout_key=dropout_key)
    weights = batch["loss_weights"].astype(jnp.float32)
    return chunked_loss_sum(model, hidden, batch["targets"], weights), jnp.sum(weights)


def split_micro(batch: dict, micro_batches: int) -> dict:
    """[B, ...] -> [micro, B / micro, ...] for every array of the batch."""
    return jax.tree.map(lambda x: x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:]), batch)


def loss_and_grads(graphdef, trainable, frozen, batch, micro_batches: int = 1, dropout_key=None):
    """Mean loss over the target tokens of ``batch`` and its gradient w.r.t. ``trainable``."""

    def sum_loss(params, micro, key):
        return batch_loss_sum(nnx.merge(graphdef, params, frozen), micro, key)

    grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
    if micro_batches == 1:
        (total, count), grads = grad_fn(trainable, batch, dropout_key)
    else:
        keys = None if dropout_key is None else jax.random.split(dropout_key, micro_batches)

        def body(acc, xs):
            micro, key = xs
            (loss, count), grads = grad_fn(trainable, micro, key)
            return jax.tree.map(jnp.add, acc, (loss, count, grads)), None

        zeros = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, trainable))
        (total, count, grads), _ = jax.lax.scan(body, zeros, (split_micro(batch, micro_batches), keys))
    count = jnp.maximum(count, 1.0)
    return total / count, jax.tree.map(lambda g: g / count, grads), count


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "micro_batches"),
                   donate_argnames=("trainable", "opt_state"))
def train_step(graphdef, trainable, frozen, opt_state, batch, *, optimizer, micro_batches: int = 1,
               dropout_key=None):
    """One optimizer step; returns (trainable, opt_state, metrics). State is donated."""
    loss, grads, count = loss_and_grads(graphdef, trainable, frozen, batch, micro_batches, dropout_key)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
    return trainable, opt_state, metrics

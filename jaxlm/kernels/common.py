"""What the attention kernels share: block sizes, padding, masks, references.

Block sizes live in one table, by backend and head dim. The float32
"highest"-precision references are what the tests hold the kernels to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.arrays import pad_axis, round_up  # noqa: F401  (the kernels' padding)

# The one "minus infinity" of every attention path (kernels, XLA cores): finite,
# so a fully masked row (left padding) gets a uniform softmax instead of NaN, as
# the reference's finfo.min masking does (exp(MASK - MASK) = 1), and any real
# score wipes it out through the running-max correction. 0.7 x max, not max,
# leaves room for the kernels' running-max arithmetic without overflow.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int          # forward: queries per program
    block_k: int          # forward: keys per inner step
    block_q_bwd: int      # backward tiles
    block_k_bwd: int
    decode_block_k: int   # decode: keys per inner step
    decode_split: int     # decode: keys per split (flash-decoding parallelism)


# (backend, head_dim) -> sizes. GPU (Triton): tiles that keep q, k, v and the
# float32 accumulator in registers/shared memory at 4-8 warps; TPU (Mosaic):
# multiples of 128 (the MXU and lane width); "interpret" runs the GPU kernels
# on CPU in tests, where small tiles keep the emulation fast.
BLOCK_TABLE: dict[tuple[str, int], BlockSizes] = {
    ("gpu", 64): BlockSizes(128, 64, 64, 64, 64, 1024),
    ("gpu", 128): BlockSizes(128, 64, 64, 64, 64, 1024),
    ("gpu", 256): BlockSizes(64, 32, 32, 32, 32, 1024),
    ("tpu", 64): BlockSizes(512, 512, 256, 256, 512, 4096),
    ("tpu", 128): BlockSizes(512, 512, 256, 256, 512, 4096),
    ("tpu", 256): BlockSizes(256, 256, 128, 128, 256, 4096),
    ("interpret", 64): BlockSizes(32, 32, 32, 32, 32, 128),
    ("interpret", 128): BlockSizes(32, 32, 32, 32, 32, 128),
    ("interpret", 256): BlockSizes(32, 32, 32, 32, 32, 128),
}


def default_backend() -> str:
    return jax.default_backend()


def kernel_head_dim(head_dim: int) -> int:
    """The tiled head dim: 64, 128 or 256 (smaller heads are zero-padded to 64)."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head_dim: {head_dim} is not supported; the kernels take up to {HEAD_DIMS[-1]}")


def block_sizes_for(kind: str, head_dim: int, override: BlockSizes | dict | None = None) -> BlockSizes:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: {head_dim} is not a kernel head dim; expected one of {HEAD_DIMS}")
    sizes = BLOCK_TABLE[(kind, head_dim)]
    if override is None:
        return sizes
    if isinstance(override, dict):
        return dataclasses.replace(sizes, **override)
    return override


def kernel_family(interpret, backend=None) -> tuple[str, object]:
    """(kernel family, interpret argument) for one kernel call.

    Families: "gpu" (Triton), "tpu" (Mosaic), "interpret" (the GPU kernels
    emulated on CPU). ``backend`` ("gpu" or "tpu") forces a family, e.g. to
    lower for a platform other than the one running (``jax.export`` checks in
    the tests); ``InterpretParams`` as ``interpret`` runs the TPU kernels so.
    """
    if backend is not None:
        if backend not in ("gpu", "tpu"):
            raise ValueError(f"backend: expected 'gpu' or 'tpu', got {backend!r}")
        return backend, interpret or False
    backend = default_backend()
    if interpret is None:
        interpret = backend not in ("gpu", "tpu")
    if backend == "tpu" or type(interpret).__name__ == "InterpretParams":
        return "tpu", interpret if interpret else False
    return ("interpret" if interpret else "gpu"), bool(interpret)


def check_inputs(q, k, v, segment_ids, causal):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"flash_attention: expected q [B, T, Hq, D] and k, v [B, S, Hkv, D]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    B, T, Hq, D = q.shape
    _, S, Hkv, Dk = k.shape
    if k.shape[0] != B or Dk != D:
        raise ValueError(f"flash_attention: batch/head_dim mismatch: q {q.shape}, k {k.shape}")
    if Hq % Hkv:
        raise ValueError(f"flash_attention: query heads {Hq} must be a multiple of kv heads {Hkv}")
    if causal and T > S:
        raise ValueError(f"flash_attention: causal attention needs T <= S, got T={T}, S={S}")
    if segment_ids is not None:
        if T != S:
            raise ValueError(f"flash_attention: segment_ids need T == S, got T={T}, S={S}")
        if segment_ids.shape != (B, T):
            raise ValueError(f"flash_attention: segment_ids must be [B, T] = {(B, T)}, got {segment_ids.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"flash_attention: {name} must be float32 or bfloat16, got {x.dtype}")


def dot_precision(dtype):
    """float32 inputs get full-precision products (no TF32 / bf16 passes)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ------------------------------------------------------------------ references
def reference_attention(q, k, v, *, causal=True, segment_ids=None, sm_scale=None):
    """float32, highest-precision attention with the kernels' semantics."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(D)
    hi = jax.lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32), precision=hi) * scale
    mask = jnp.ones((T, S), bool)
    if causal:
        mask = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T)
    mask = jnp.broadcast_to(mask, (B, T, S))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=hi)
    return out.reshape(B, T, Hq, D)


def reference_decode(q, k_cache, v_cache, lengths, *, sm_scale=None):
    B, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(D)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bkgd,bskd->bkgs", q.astype(jnp.float32).reshape(B, Hkv, G, D),
                   k_cache.astype(jnp.float32), precision=hi) * scale
    valid = jnp.arange(S)[None, :] < lengths[:, None]
    s = jnp.where(valid[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgs,bskd->bkgd", p, v_cache.astype(jnp.float32), precision=hi)
    return out.reshape(B, Hq, D)


def merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combines split-K partial outputs by log-sum-exp.

    ``o_parts [..., n, G, D]`` (each normalized within its split) and
    ``lse_parts [..., n, G]`` (-inf for an empty split) -> (out ``[..., G, D]``,
    lse ``[..., G]``; -inf where every split was empty).
    """
    m = jnp.max(lse_parts, axis=-2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_parts - m)                                   # [..., n, G]
    total = jnp.sum(w, axis=-2)                                  # [..., G]
    out = jnp.sum(w[..., None] * o_parts, axis=-3)              # [..., G, D]
    safe = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, m[..., 0, :] + jnp.log(safe), -jnp.inf)
    return out / safe[..., None], lse


# ------------------------------------------------------------- poisoned outputs
_poison = {"on": False}


@contextlib.contextmanager
def poison_outputs():
    """Tests: every kernel output starts as NaN, so an element a kernel forgets
    to write fails the comparison instead of passing as a stale zero.

    (The TPU kernels get the same from ``InterpretParams(uninitialized_memory="nan")``.)
    """
    previous = _poison["on"]
    _poison["on"] = True
    try:
        yield
    finally:
        _poison["on"] = previous


def pallas_call(kernel, *, in_specs, out_specs, out_shape, **kwargs):
    """``pl.pallas_call``; under `poison_outputs`, outputs alias NaN-filled inputs."""
    from jax.experimental import pallas as pl

    if not _poison["on"]:
        return pl.pallas_call(kernel, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, **kwargs)
    outs = list(out_shape) if isinstance(out_shape, (list, tuple)) else [out_shape]
    specs = list(out_specs) if isinstance(out_specs, (list, tuple)) else [out_specs]
    n_refs = len(in_specs)

    def with_poison_inputs(*refs):
        return kernel(*refs[:n_refs], *refs[n_refs + len(outs):])

    def run(*args):
        n_leaves = len(jax.tree.leaves(args))  # None inputs take no operand slot
        poison = [jnp.full(o.shape, jnp.nan if jnp.issubdtype(o.dtype, jnp.floating) else -1, o.dtype)
                  for o in outs]
        call = pl.pallas_call(with_poison_inputs, in_specs=list(in_specs) + specs, out_specs=out_specs,
                              out_shape=out_shape,
                              input_output_aliases={n_leaves + i: i for i in range(len(outs))}, **kwargs)
        return call(*args, *poison)

    return run

"""The one attention dispatch: (mask, implementation, mesh) -> a typed plan, then run it.

Every attention call of the model goes through here: one-shot prefill,
chunked prefill against a cache, decoding, and all of them on a mesh whose
``context`` axis splits the sequence. `plan_attention` decides, in Python at
trace time, what runs:

- ``mode``: "prefill" (queries attend causally/segment-wise to keys) or
  "decode" (one query per row against the cache), taken from the mask's
  explicit ``decode`` flag, never from the number of queries;
- ``impl``: "xla" (`jaxlm.nn.attention`), "pallas" (`jaxlm.kernels`) or
  "cudnn" (``jax.nn.dot_product_attention``) for the local attention;
- ``flash``: the kernel's mask arguments (`FlashArgs`), when a kernel runs;
- ``context_axis`` / ``context_strategy``: when a mesh axis splits the key
  slots, how the devices combine their shards (`jaxlm.nn.context_parallel`).

A requested implementation that cannot take a mask falls back (cuDNN ->
Pallas -> XLA) and says so once in the log, naming the reason.

A KV cache reaches attention as stored (`attend_cache` takes a
`jaxlm.nn.kv_cache.KVView`): decoding reads int8 values with their scales and
pages through their block table in place (the Pallas decode and paged
kernels, or the XLA cores; for pages XLA gathers the rows' pages first, the
pure-JAX reference path that CPU runs). Only the float-only attention
(flash prefill kernels, cuDNN, context-parallel shards) gets a dequantized copy.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp

from jaxlm import kernels
from jaxlm.errors import ConfigError
from jaxlm.nn import context_parallel
from jaxlm.nn.kv_cache import KVView
from jaxlm.options import ATTENTION_IMPLS
from jaxlm.nn.attention import AttentionMask, blockwise_attention, xla_attention, xla_decode_attention
from jaxlm.sharding import ACT, active_mesh_axes, context_axis, logical_to_spec

log = logging.getLogger("jaxlm.attention")
_logged: set[str] = set()

CUDNN_DTYPES = ("bfloat16", "float16")   # cuDNN's fused attention has no float32 kernel
CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class FlashArgs:
    """The flash kernel's mask arguments (see `jaxlm.kernels.flash_attention`)."""

    causal: bool
    segment_ids: jax.Array | None = None      # [B, T] (with T == S: the keys' too)
    kv_segment_ids: jax.Array | None = None   # [B, S] when T != S
    q_offset: jax.Array | None = None         # key slot of query 0 (None: S - T)

    def kwargs(self) -> dict:
        return dict(causal=self.causal, segment_ids=self.segment_ids, kv_segment_ids=self.kv_segment_ids,
                    q_offset=self.q_offset)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    mode: str                              # "prefill" | "decode"
    impl: str                              # "xla" | "pallas" | "cudnn": the local attention
    flash: FlashArgs | None = None         # set when impl is "pallas" (prefill)
    context_axis: str | None = None        # mesh axis splitting the key slots
    context_strategy: str | None = None    # "allgather" | "ring" (prefill), "lse_merge" (decode)
    fallback: str | None = None            # why the requested implementation is not the one used


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """'auto' -> Pallas on GPU/TPU, XLA elsewhere; 'cudnn' only where cuDNN exists."""
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        return "pallas" if backend in ("gpu", "tpu") else "xla"
    if impl == "cudnn" and backend != "gpu":
        raise ConfigError(f"attention_impl='cudnn' needs an NVIDIA GPU with cuDNN, but the backend is "
                          f"{backend!r}; use attention_impl='auto', 'pallas' or 'xla'")
    return impl


def plan_attention(mask: AttentionMask, q_shape, *, impl: str = "auto", context: str = "allgather",
                   dtype=None, backend: str | None = None, mesh_axes: dict[str, int] | None = None
                   ) -> AttentionPlan:
    """How to attend ``q [B, T, K, G, D]`` to ``mask.kv_len`` keys under ``mask``.

    ``context`` is the prefill strategy on a context axis ("allgather",
    "ring", or "xla": leave it to the partitioner). ``mesh_axes`` defaults to
    the active mesh; ``backend`` to JAX's default (both settable for tests).
    """
    backend = backend or jax.default_backend()
    impl = resolve_impl(impl, backend)
    sizes = active_mesh_axes() if mesh_axes is None else mesh_axes
    axis = context_axis(sizes)
    if mask.decode:
        fallback = None
        if impl == "cudnn":
            impl, fallback = "pallas", "decoding runs the Pallas decode kernel (cuDNN has no KV-cache decode here)"
        return _logged_plan(AttentionPlan("decode", impl, None, axis, "lse_merge" if axis else None, fallback))
    strategy = None
    if axis and context != "xla" and _splits_over(axis, q_shape, mask.kv_len, sizes):
        strategy = context
    if impl == "xla":
        return AttentionPlan("prefill", "xla", None, axis if strategy else None, strategy)
    flash, why_not = flash_args(mask, q_shape)
    if impl == "cudnn":
        why_not_cudnn = _cudnn_misfit(mask, q_shape, dtype, strategy)
        if why_not_cudnn is None:
            return AttentionPlan("prefill", "cudnn", None)
        impl = "pallas"
        fallback = f"cuDNN does not fit ({why_not_cudnn}): Pallas flash attention instead"
        if flash is None:
            impl, fallback = "xla", f"cuDNN does not fit ({why_not_cudnn}), nor does the flash kernel ({why_not})"
        return _logged_plan(AttentionPlan("prefill", impl, flash, axis if strategy else None, strategy, fallback))
    if flash is None:
        return _logged_plan(AttentionPlan("prefill", "xla", None, axis if strategy else None, strategy,
                                          f"the flash kernel does not take this mask ({why_not}): XLA attention"))
    return AttentionPlan("prefill", "pallas", flash, axis if strategy else None, strategy)


def _logged_plan(plan: AttentionPlan) -> AttentionPlan:
    if plan.fallback:
        _log_once(plan.fallback)
    return plan


def _log_once(why: str) -> None:
    if why not in _logged:
        _logged.add(why)
        log.warning("attention: %s", why)


def _splits_over(axis: str, q_shape, kv_len: int, sizes) -> bool:
    """Both the queries and the key slots divide over the context axis."""
    q_spec = logical_to_spec(ACT["queries"], sizes, shape=q_shape)
    B, _, K, _, D = q_shape
    kv_spec = logical_to_spec(ACT["kv_cache"], sizes, shape=(B, kv_len, K, D))
    return q_spec[1] == axis and kv_spec[1] == axis


def flash_args(mask: AttentionMask, q_shape) -> tuple[FlashArgs | None, str | None]:
    """The flash kernel's arguments for this mask, or (None, why it does not fit)."""
    B, T = q_shape[0], q_shape[1]
    S = mask.kv_len
    offset = mask.q_offset
    if not isinstance(offset, int) and jnp.ndim(offset) != 0:
        return None, "per-row query offsets"
    # key_lengths: keys past a row's length come after its valid queries, so a
    # causal mask already hides them (padded queries produce ignored rows).
    if mask.key_lengths is not None and not mask.causal:
        return None, "key lengths without a causal mask"
    q_seg, kv_seg = mask.q_segment, mask.kv_segment
    if mask.key_valid is not None:
        valid = jnp.broadcast_to(mask.key_valid.astype(jnp.int32), (B, S))   # a [1, S] mask serves every row
        kv_seg = valid if kv_seg is None else jnp.where(valid > 0, kv_seg, -1)
        if q_seg is None:  # queries keep segment 1: valid ones read only valid keys
            q_seg = jnp.ones((B, T), jnp.int32)
    static = isinstance(offset, int) and offset == S - T
    if T == S and static:  # one segment array serves queries and keys (pads: their own segment)
        return FlashArgs(mask.causal, kv_seg if kv_seg is not None else q_seg), None
    return FlashArgs(mask.causal, q_seg, kv_seg, None if static else jnp.asarray(offset, jnp.int32)), None


def _cudnn_misfit(mask: AttentionMask, q_shape, dtype, strategy) -> str | None:
    """Why cuDNN's fused attention cannot run this prefill, or None when it can."""
    T, D = q_shape[1], q_shape[-1]
    if dtype is not None and jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"{jnp.dtype(dtype).name} inputs; cuDNN takes {' or '.join(CUDNN_DTYPES)}"
    if D > CUDNN_MAX_HEAD_DIM or D % 8:
        return f"head_dim {D}"
    if strategy is not None:
        return "a context-parallel axis"
    if mask.kv_len != T or not isinstance(mask.q_offset, int) or mask.q_offset != 0:
        return "queries against a KV cache (an offset)"
    if mask.key_valid is not None or mask.q_segment is not None:
        return "padding or packed-segment masks"
    return None


# ------------------------------------------------------------------ running
def attend(q, k, v, mask: AttentionMask, plan: AttentionPlan):
    """``q [B, T, K, G, D]``, float ``k/v [B, S, K, D]`` -> ``[B, T, K, G, D]`` as ``plan`` says.

    In decode mode T is 1 and ``k``/``v`` are the whole caches.
    """
    return attend_cache(q, KVView(k, v), mask, plan)


def attend_cache(q, kv: KVView, mask: AttentionMask, plan: AttentionPlan):
    """``q [B, T, K, G, D]`` against a cache as stored (int8 and scales, or pages) -> ``[B, T, K, G, D]``."""
    kv = _in_compute_dtype(kv, q.dtype)
    B, T, K, G, D = q.shape
    if plan.mode == "decode":
        q3 = q.reshape(B, K * G, D)
        if plan.context_axis:   # the shards travel as floats: context parallelism takes no int8 or pages yet
            k, v = kv.dequantized(q.dtype)
            out = context_parallel.decode_attention(q3, k, v, mask.key_lengths, plan.context_axis,
                                                    local=_decode_local(plan.impl))
        else:
            out = _decode_in_place(plan.impl, q3, kv, mask.key_lengths)[0].astype(q.dtype)
        return out.reshape(B, T, K, G, D)
    if plan.impl == "xla" and not plan.context_strategy:
        kv = kv.contiguous()
        return xla_attention(q, kv.k, kv.v, mask, k_scale=kv.k_scale, v_scale=kv.v_scale)
    k, v = kv.dequantized(q.dtype)
    if plan.context_strategy:
        return context_parallel.prefill_attention(q, k, v, mask, plan.context_axis, plan.context_strategy,
                                                  local=_prefill_local(plan.impl))
    q4 = q.reshape(B, T, K * G, D)
    if plan.impl == "cudnn":
        out = jax.nn.dot_product_attention(q4, k, v, is_causal=mask.causal, implementation="cudnn")
    else:
        out = kernels.flash_attention(q4, k, v, **plan.flash.kwargs())
    return out.reshape(B, T, K, G, D)


def _in_compute_dtype(kv: KVView, dtype) -> KVView:
    """A float cache stored in another dtype than the compute dtype is converted (int8 stays as stored)."""
    if kv.quantized or kv.k.dtype == dtype:
        return kv
    return dataclasses.replace(kv, k=kv.k.astype(dtype), v=kv.v.astype(dtype))


def _decode_in_place(impl: str, q, kv: KVView, lengths):
    """Decode ``q [B, H, D]`` against ``kv`` as stored -> (out float32, lse)."""
    if impl != "xla" and kv.paged:
        why = kernels.paged_kernel_misfit(kv.k.shape[1])
        if why is None:
            return _per_device(_paged_kernel, q, kv, lengths)
        impl = "xla"
        _log_once(f"the paged decode kernel does not fit ({why}): the XLA gather path")
    if impl == "xla":
        kv = kv.contiguous()
        return xla_decode_attention(q, kv.k, kv.v, lengths, return_lse=True, k_scale=kv.k_scale,
                                    v_scale=kv.v_scale)
    return _per_device(_decode_kernel, q, kv, lengths)


def _paged_kernel(q, kv: KVView, lengths):
    return kernels.paged_decode_attention(q, kv.k, kv.v, kv.block_table, lengths, k_scale=kv.k_scale,
                                          v_scale=kv.v_scale, return_lse=True)


def _decode_kernel(q, kv: KVView, lengths):
    return kernels.decode_attention(q, kv.k, kv.v, lengths, k_scale=kv.k_scale, v_scale=kv.v_scale,
                                    return_lse=True)


def _per_device(kernel, q, kv: KVView, lengths):
    """``kernel`` on each device's rows and kv heads when a mesh splits them.

    A Pallas call is opaque to XLA's partitioner, which would gather the whole
    cache (or pool) onto every device first; here each device runs it on its
    own shards. Layouts the shards cannot follow (query heads and kv heads
    split differently, cache slots split) are left to XLA.
    """
    sizes = active_mesh_axes()
    if not sizes or all(n == 1 for n in sizes.values()):
        return kernel(q, kv, lengths)
    P = jax.sharding.PartitionSpec
    q_spec = logical_to_spec(ACT["decode_queries"], sizes, shape=q.shape)
    rows, heads = q_spec[0], q_spec[1]
    names = ("kv_pages", "kv_page_scale") if kv.paged else ("kv_cache", "kv_scale")
    cache_spec = logical_to_spec(ACT[names[0]], sizes, shape=kv.k.shape)
    scale_spec = logical_to_spec(ACT[names[1]], sizes, shape=kv.k.shape[:3]) if kv.quantized else None
    dims = lambda spec: tuple(spec)[:3] + (None,) * (3 - len(tuple(spec)[:3]))
    lead = (None, None) if kv.paged else (rows, None)   # pages whole on every device; a cache by rows
    if dims(cache_spec) != lead + (heads,) or (scale_spec is not None and dims(scale_spec) != dims(cache_spec)):
        return kernel(q, kv, lengths)
    specs = KVView(cache_spec, cache_spec, scale_spec, scale_spec, P(rows, None) if kv.paged else None)
    return jax.shard_map(kernel, in_specs=(q_spec, specs, P(rows)), out_specs=(P(rows, heads, None), P(rows, heads)),
                         check_vma=False)(q, kv, lengths)


def _prefill_local(impl: str):
    """``(q, k, v, mask) -> (out float32, lse)`` on one device's shard (inside ``shard_map``)."""

    def local(q, k, v, mask):
        B, T, K, G, D = q.shape
        flash, _ = flash_args(mask, q.shape) if impl != "xla" else (None, None)
        if flash is None:
            return blockwise_attention(q, k, v, mask, return_lse=True)
        out, lse = kernels.flash_attention_with_lse(q.reshape(B, T, K * G, D), k, v, **flash.kwargs())
        return out.reshape(B, T, K, G, D), lse.reshape(B, T, K, G)

    return local


def _decode_local(impl: str):
    """``(q [B, H, D], k_cache, v_cache, lengths) -> (out [B, H, D] float32, lse [B, H])``."""
    if impl == "xla":
        return lambda q, k, v, lengths: xla_decode_attention(q, k, v, lengths, return_lse=True)
    return lambda q, k, v, lengths: kernels.decode_attention(q, k, v, lengths, return_lse=True)

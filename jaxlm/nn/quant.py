"""Weight-only int8 / int4 quantization of a `jaxlm.nn.linear.Projection` kernel.

Formats (symmetric, round to nearest, zero maps to zero):

- ``int8``: ``kernel`` int8, same shape and logical axes as the float kernel;
  ``kernel_scale`` float32 ``[*out]``, one scale per output channel:
  ``w[o, i] = q[o, i] * scale[o]``.
- ``int4``: ``kernel`` ``jnp.int4`` (two values per byte in device memory),
  same shape and axes; ``kernel_scale`` float32 ``[*out, groups]``, one scale
  per group of ``min(128, in)`` consecutive elements of the flattened input
  (the last group shorter when the input does not divide).

The int values keep the kernel's shape, so they shard exactly like it (the
rules table applies unchanged); the scales carry the output axes' names and,
for int4, the first input axis' name on the groups axis.

Why not qwix: qwix 0.1.8 (PtqProvider with rules matching every
``wqkv|wo|w1|w2|w3``) was run on the golden model and left all ten decoder
matrices float32, silently: it finds a weight by tracing the operand of
``dot_general`` back to a parameter, and `Projection` reshapes its kernel to a
2-D view first. Its weight-only path also dequantizes before the dot and
relies on XLA to fuse that, which XLA:CPU does not do (see `matmul`). Writing
the quantizer here keeps the packed ``wqkv`` layout, the logical axis names
and the choice of matmul under our control.

The host quantizer (`quantize` with ``xp=numpy``) runs tensor by tensor as a
checkpoint is read, so the full-precision model is never held; the same code
with ``xp=jax.numpy`` quantizes a freshly initialized model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxlm.kernels import cpu_int8
from jaxlm.options import QUANTIZE_MODES as MODES
from jaxlm.sharding import active_mesh_axes
GROUP_SIZE = 128                       # int4: inputs per scale
QMAX = {"int8": 127, "int4": 7}        # symmetric ranges: -QMAX..QMAX
STORAGE = {"int8": np.dtype(np.int8), "int4": np.dtype(ml_dtypes.int4)}
SCALE_SUFFIX = "_scale"                # ``kernel`` -> ``kernel_scale``

# CPU only: rows of a weight dequantized at a time (about 192 KiB of float32,
# so a block stays in L2 while the dot reads it). Measured on the 217M
# benchmark's 60 decoder matrices (2 cores, batch 1): dequantize-then-dot of
# the whole weight 96 ms/token (XLA:CPU materializes the float weight, then
# runs the GEMM), blocks of 64 rows 22.6 ms, float32 weights 19.4 ms.
CPU_BLOCK_ELEMENTS = 48 * 1024
MIN_CPU_BLOCK_ROWS = 8


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES} or None, got {mode!r}")


def groups(in_size: int) -> tuple[int, int]:
    """int4: (group size, number of groups) along an input of ``in_size`` elements."""
    size = min(GROUP_SIZE, in_size)
    return size, -(-in_size // size)


def scale_shape(kernel_shape, in_dims: int, mode: str) -> tuple[int, ...]:
    out = tuple(kernel_shape[: len(kernel_shape) - in_dims])
    if mode == "int8":
        return out
    return out + (groups(math.prod(kernel_shape[len(kernel_shape) - in_dims:]))[1],)


def scale_axes(kernel_axes, in_dims: int, mode: str) -> tuple[str | None, ...]:
    out = tuple(kernel_axes[: len(kernel_axes) - in_dims])
    # int4 groups run along the flattened input: they split where its first axis splits
    return out if mode == "int8" else out + (kernel_axes[len(kernel_axes) - in_dims],)


def _expand_groups(scale2, in_size: int, xp):
    """``[O, n]`` group scales -> ``[O, in_size]`` (each repeated over its group)."""
    size, n = groups(in_size)
    rows = scale2.shape[0]
    full = xp.broadcast_to(scale2[:, :, None], (rows, n, size)).reshape(rows, n * size)
    return full[:, :in_size]


def quantize(w, in_dims: int, mode: str, xp=np):
    """(int values with ``w``'s shape, float32 scales) of a float kernel ``[*out, *in]``."""
    shape = tuple(w.shape)
    in_size = math.prod(shape[len(shape) - in_dims:])
    w2 = xp.asarray(w).astype(np.float32).reshape(-1, in_size)
    qmax = QMAX[mode]
    if mode == "int8":
        amax = xp.max(xp.abs(w2), axis=1)
    else:
        size, n = groups(in_size)
        padded = xp.pad(w2, ((0, 0), (0, n * size - in_size))).reshape(w2.shape[0], n, size)
        amax = xp.max(xp.abs(padded), axis=2)
    scale = xp.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    per_elem = scale[:, None] if mode == "int8" else _expand_groups(scale, in_size, xp)
    q = xp.clip(xp.round(w2 / per_elem), -qmax, qmax)
    return (q.reshape(shape).astype(STORAGE[mode]),
            scale.reshape(scale_shape(shape, in_dims, mode)))


def dequantize(q, scale, in_dims: int, mode: str, xp=np, dtype=np.float32):
    """The float kernel ``q * scale`` (for merging, export and tests; never in the forward)."""
    shape = tuple(q.shape)
    in_size = math.prod(shape[len(shape) - in_dims:])
    q2 = xp.asarray(q).astype(np.float32).reshape(-1, in_size)
    s2 = xp.asarray(scale).astype(np.float32).reshape(q2.shape[0], -1)
    per_elem = s2 if mode == "int8" else _expand_groups(s2, in_size, xp)
    return (q2 * per_elem).reshape(shape).astype(dtype)


def _dot(x2, w2):
    return jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())))


def _block_product(x2, q2, s2, mode, dtype):
    """``x2 [T, I] . dequant(q2 [R, I])^T`` for a block of rows; the int8 scale goes on the output."""
    if mode == "int8":
        return _dot(x2, q2.astype(dtype)) * s2.astype(dtype)
    return _dot(x2, q2.astype(dtype) * _expand_groups(s2, q2.shape[1], jnp).astype(dtype))


def _cpu_block_rows(rows: int, in_size: int) -> int | None:
    target = max(MIN_CPU_BLOCK_ROWS, CPU_BLOCK_ELEMENTS // in_size)
    if rows <= target:
        return None
    return next((r for r in range(target, MIN_CPU_BLOCK_ROWS - 1, -1) if rows % r == 0), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_matmul(x2, q2, s2, mode):
    if mode == "int8":
        return cpu_int8.int8_matmul(x2, q2, s2)
    return cpu_int8.int4_matmul(x2, q2, s2, groups(q2.shape[1])[0])


def _kernel_fwd(x2, q2, s2, mode):
    return _kernel_matmul(x2, q2, s2, mode), (q2, s2)


def _kernel_bwd(mode, res, g):   # d/dx only: the int values and scales are frozen (QLoRA trains adapters)
    q2, s2 = res
    w = q2.astype(g.dtype) * (s2[:, None] if mode == "int8" else _expand_groups(s2, q2.shape[1], jnp))
    return jax.lax.dot_general(g, w, (((1,), (0,)), ((), ()))), None, None


_kernel_matmul.defvjp(_kernel_fwd, _kernel_bwd)


def _use_cpu_kernel(x2, in_size: int) -> bool:
    """Few tokens on one CPU device (a custom call does not partition over a mesh); int4 rows must
    start on a byte (an even input size)."""
    sizes = active_mesh_axes()
    return (jax.default_backend() == "cpu" and x2.shape[0] <= cpu_int8.MAX_TOKENS and in_size % 2 == 0
            and all(v == 1 for v in sizes.values()) and cpu_int8.available())


def matmul(x2, q2, s2, mode: str, dtype):
    """``x2 [T, I] . (q2 [O, I] * scale)^T`` with the dequantization inside the matmul.

    GPU / TPU: one ``dot_general`` whose weight operand is ``convert(q)``
    (times the group scales for int4); XLA fuses the conversion into the
    matmul's operand read, so the int values are what crosses the memory bus
    and no float copy of the weight exists. XLA:CPU does not fuse it (it
    writes the whole float weight, then runs its GEMM: 5x slower than
    float32), so on CPU decoding runs a C++ kernel that reads each int8 / int4
    weight once (`jaxlm.kernels.cpu_int8`), and everything else a scan over
    blocks of rows, each dequantized into a cache-sized temporary and
    multiplied at once. ``s2`` is ``[O]`` (int8) or ``[O, groups]`` (int4).
    """
    rows, in_size = q2.shape
    if _use_cpu_kernel(x2, in_size):
        return _kernel_matmul(x2.astype(jnp.float32), q2, s2.astype(jnp.float32), mode).astype(dtype)
    block = _cpu_block_rows(rows, in_size) if jax.default_backend() == "cpu" else None
    if block is None:
        return _block_product(x2, q2, s2, mode, dtype)
    nb = rows // block
    q3 = q2.reshape(nb, block, in_size)
    s3 = s2.reshape((nb, block) + s2.shape[1:])

    def step(_, blk):
        return None, _block_product(x2, blk[0], blk[1], mode, dtype)

    _, ys = jax.lax.scan(step, None, (q3, s3))                # [nb, T, block]
    return jnp.moveaxis(ys, 0, 1).reshape(x2.shape[0], rows)

"""The CPU fast path of int8 / int4 weight-only matmuls: a small C++ kernel through ``jax.ffi``.

Why a kernel of our own: XLA:CPU neither fuses an int8 -> float conversion
into its GEMM (dequantize-then-dot wrote the whole float weight each call:
5x slower than float32 on the 217M benchmark's decoder matrices) nor runs
``dot_general(int8, int8) -> int32`` fast (150 ms/token against 17 ms for
float32: a naive loop). Cache-sized row blocks (`jaxlm.nn.quant`) reached
only 0.86x float32. `cpu_int8_matmul.cc` reads each int8 (or packed int4)
weight once and widens it in registers (AVX-512 when the machine has it), so
a decode step reads a quarter (an eighth) of float32's bytes.

It is compiled on first use with the system's C++ compiler into a cache
directory (``$JAXLM_CACHE`` or ``~/.cache/jaxlm``), keyed by the source and
jax version; without a compiler, or with ``JAXLM_CPU_INT8_KERNEL=0``, the
XLA path runs instead (`available` says which). Only for few tokens (decode):
prefill is compute-bound and XLA's GEMM on dequantized blocks does better.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxlm.kernels")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_int8_matmul.cc")
TARGET = "jaxlm_int8_matmul"
TARGET_INT4 = "jaxlm_int4_matmul"
MAX_TOKENS = 16   # rows of x up to which the kernel beats XLA (decode, small batches)


def _cache_dir() -> str:
    return os.environ.get("JAXLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxlm"))


def _cpu_flags() -> bytes:
    """The CPU's feature flags: the library is built with -march=native, so a shared cache must not
    hand it to another kind of machine."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return platform.processor().encode()


def _build() -> str:
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + jax.__version__.encode() + platform.machine().encode()
                             + _cpu_flags()).hexdigest()[:16]
    lib = os.path.join(_cache_dir(), f"cpu_int8_matmul-{key}.so")
    if os.path.isfile(lib):
        return lib
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    os.makedirs(os.path.dirname(lib), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(lib)) as tmp:
        out = os.path.join(tmp, "lib.so")
        cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
               "-I", jax.ffi.include_dir(), SOURCE, "-o", out]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed: {result.stderr.strip()[-500:]}")
        os.replace(out, lib)   # atomic: concurrent builders leave one complete file
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered (once per process)."""
    if os.environ.get("JAXLM_CPU_INT8_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(_build())
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxlmInt8Matmul), platform="cpu")
        jax.ffi.register_ffi_target(TARGET_INT4, jax.ffi.pycapsule(lib.JaxlmInt4Matmul), platform="cpu")
    except Exception as e:  # a missing compiler or headers: the XLA path still works
        log.warning("the CPU int8 matmul kernel is unavailable, using XLA's path: %s", e)
        return False
    return True


def int8_matmul(x2: jax.Array, q2: jax.Array, scale: jax.Array) -> jax.Array:
    """``x2 [T, I] float32 . (q2 [O, I] int8 * scale [O])^T`` -> ``[T, O]`` float32 (call `available` first)."""
    out = jax.ShapeDtypeStruct((x2.shape[0], q2.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        x2.astype(jnp.float32), q2, scale.astype(jnp.float32))


def int4_matmul(x2: jax.Array, q2: jax.Array, scale: jax.Array, group: int) -> jax.Array:
    """``x2 [T, I] . dequant(q2 [O, I] int4, scale [O, groups])^T`` -> ``[T, O]`` float32; ``I`` and
    ``group`` even (a row then starts on a byte)."""
    out = jax.ShapeDtypeStruct((x2.shape[0], q2.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET_INT4, out, vmap_method="sequential")(
        x2.astype(jnp.float32), q2, scale.astype(jnp.float32), group=np.int64(group))

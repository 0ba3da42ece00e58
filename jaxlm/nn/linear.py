"""A projection with a structured kernel, computed as one 2-D matmul.

Kernels keep PyTorch's ``[out..., in...]`` order (as HF stores them) but with
their structure: the packed attention projection is
``[kv_heads, slot, head_dim, embed]``, which lets tensor parallelism split it
by kv group. Measured on CPU (XLA 0.10, 2 cores), the skinny matmuls of
batched decoding run 20-45% faster against ``[out, in]`` weights than
against ``[in, out]``, and prefill matmuls no slower.

The matmul runs on 2-D views (``[tokens, in] . [out, in]^T``): given an N-D
einsum, XLA:CPU's layout assignment sometimes transposed the *weights* on
every call (a weight copy per decode step); flat views leave it no choice.
qwix-style LoRA and quantization still see one ``dot_general`` per call.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn import quant
from jaxlm.nn.params import logical_axes, logical_param, normal, zeros


def check_spec(spec: str, kernel_rank: int, in_dims: int) -> None:
    """``spec`` must describe what `Projection.__call__` computes: ``x[..., in] . kernel[out, in]``.

    The kernel has ``kernel_rank`` named dims, its last ``in_dims`` are the
    last dims of ``x``, and the output is ``x``'s leading dims followed by
    the kernel's out dims.
    """
    try:
        inputs, out = spec.replace(" ", "").split("->")
        x, kernel = inputs.split(",")
    except ValueError:
        raise ValueError(f"Projection spec {spec!r}: expected 'x_dims,kernel_dims->out_dims'") from None
    lead = x[: len(x) - in_dims]
    problems = []
    if len(kernel) != kernel_rank:
        problems.append(f"names {len(kernel)} kernel dims, the kernel has {kernel_rank}")
    if kernel[kernel_rank - in_dims:] != x[len(x) - in_dims:]:
        problems.append(f"the kernel's last {in_dims} dims must be the input's last {in_dims}")
    if out != lead + kernel[: kernel_rank - in_dims]:
        problems.append(f"the output must be {lead + kernel[: kernel_rank - in_dims]!r}")
    if problems:
        raise ValueError(f"Projection spec {spec!r}: " + "; ".join(problems))


class Projection(nnx.Module):
    """``y[..., out] = sum_in x[..., in] * kernel[out, in] (+ bias[out])``.

    ``kernel_shape = out_shape + in_shape``; the last ``in_dims`` kernel dims
    are contracted with ``x``'s last ``in_dims`` dims. ``spec`` names the
    contraction gemma-style (``"BTE,KCDE->BTKCD"``); it is not executed (see
    the module docstring) but checked against the kernel's shape here, so it
    cannot drift from the computation.

    With ``quantize`` ("int8" or "int4") the kernel holds int values and
    ``kernel_scale`` their scales (`jaxlm.nn.quant`), and the matmul
    dequantizes inside the dot.
    """

    kernel_scale = None  # set when quantized

    def __init__(self, spec: str, kernel_shape: Sequence[int], kernel_axes: Sequence[str], *,
                 in_dims: int = 1, bias: bool = False, init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, quantize: str | None = None, rngs: nnx.Rngs):
        check_spec(spec, len(kernel_shape), in_dims)
        quant.check_mode(quantize)
        self.spec = spec
        self.dtype = dtype
        self.in_dims = in_dims
        self.quantize = quantize
        self.kernel = logical_param(rngs, normal(init_std), kernel_shape, kernel_axes, param_dtype)
        if quantize is not None:  # a new model: initialized in float, then quantized
            q, scale = quant.quantize(self.kernel[...], in_dims, quantize, jnp)
            self.kernel = nnx.Param(q, logical_axes=tuple(kernel_axes))
            self.kernel_scale = nnx.Param(scale, logical_axes=quant.scale_axes(kernel_axes, in_dims, quantize))
        out_shape, out_axes = tuple(kernel_shape[:-in_dims]), tuple(kernel_axes[:-in_dims])
        self.bias = logical_param(rngs, zeros, out_shape, out_axes, param_dtype) if bias else None

    lora_a = None  # set by `add_lora`
    lora_b = None

    def add_lora(self, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs) -> None:
        """Adds trainable low-rank factors: ``y += (alpha / rank) * B(A(dropout(x)))``.

        ``lora_a [r, *in]`` starts random, ``lora_b [*out, r]`` at zero (so the
        model is unchanged until trained), as PEFT does. A stacked (scanned)
        projection gets stacked factors.
        """
        axes = logical_axes(self.kernel)
        shape = self.kernel[...].shape
        lead = 1 if axes and axes[0] == "layers" else 0
        n = self.in_dims
        in_shape, out_shape = shape[len(shape) - n:], shape[lead: len(shape) - n]
        in_axes, out_axes = axes[len(shape) - n:], axes[lead: len(shape) - n]
        stack, stack_axes = shape[:lead], axes[:lead]
        bound = 1.0 / math.sqrt(math.prod(in_shape))  # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in]
        a = jax.random.uniform(rngs.params(), stack + (rank,) + tuple(in_shape), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=stack_axes + ("lora",) + tuple(in_axes))
        self.lora_b = nnx.LoRAParam(jnp.zeros(stack + tuple(out_shape) + (rank,), jnp.float32),
                                    logical_axes=stack_axes + tuple(out_axes) + ("lora",))
        self.lora_scale = alpha / rank
        self.lora_dropout = dropout

    def dequantized_kernel(self) -> jax.Array:
        """The kernel in float32 (``q * scale`` when quantized); for merging and export, not the forward."""
        if self.quantize is None:
            return self.kernel[...].astype(jnp.float32)
        return quant.dequantize(self.kernel[...], self.kernel_scale[...], self.in_dims, self.quantize, jnp)

    def dequantize_(self, dtype) -> None:
        """Replaces int values + scales by the float kernel ``q * scale`` in ``dtype`` (in place)."""
        if self.quantize is None:
            return
        self.kernel.set_value(self.dequantized_kernel().astype(dtype))
        self.kernel_scale = None
        self.quantize = None

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        kernel = self.kernel[...]
        n = self.in_dims
        out_shape, in_size = kernel.shape[:-n], math.prod(kernel.shape[-n:])
        rows = math.prod(out_shape)
        lead = x.shape[: x.ndim - n]
        x2 = x.astype(self.dtype).reshape(math.prod(lead), in_size)
        if self.quantize is None:
            y = jax.lax.dot_general(x2, kernel.astype(self.dtype).reshape(rows, in_size), (((1,), (1,)), ((), ())))
        else:
            y = quant.matmul(x2, kernel.reshape(rows, in_size), self.kernel_scale[...].reshape(rows, -1)
                             if self.quantize == "int4" else self.kernel_scale[...].reshape(rows),
                             self.quantize, self.dtype)
        if self.lora_a is not None:
            y = y + self._lora(x2, dropout_key).astype(y.dtype)
        y = y.reshape(lead + tuple(out_shape))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def _lora(self, x2, dropout_key):
        a = self.lora_a[...]
        b = self.lora_b[...]
        rank = a.shape[0]
        a2, b2 = a.reshape(rank, -1), b.reshape(-1, rank)
        h = x2.astype(jnp.float32)
        if dropout_key is not None and self.lora_dropout > 0:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0.0)
        dn = (((1,), (1,)), ((), ()))
        return self.lora_scale * jax.lax.dot_general(jax.lax.dot_general(h, a2, dn), b2, dn)

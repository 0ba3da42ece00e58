"""Which checkpoint tensors are quantized, and the names and shapes of their scales.

A quantized jaxlm checkpoint stores each decoder matrix (``wqkv``, ``wo``,
``w1``, ``w2``, ``w3``; with ``quantize_output`` also ``output``) as its int
values under the float kernel's name and layout, plus ``<name>_scale``
(`jaxlm.nn.quant`); every other tensor is stored as in a float checkpoint.
The marker (``jaxlm_checkpoint.json``) records the mode.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.config import InternLM2Config
from jaxlm.nn import quant

DECODER_MATRICES = ("attention.wqkv.kernel", "attention.wo.kernel", "feed_forward.w1.kernel",
                    "feed_forward.w2.kernel", "feed_forward.w3.kernel")
OUTPUT_HEAD = "output.kernel"


def is_quantized(name: str, quantize_output: bool = False) -> bool:
    """Whether the jaxlm tensor ``name`` (per-layer or stacked) is one that quantization converts."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        rest = ".".join(p for p in parts[2:] if not p.isdigit())
        return rest in DECODER_MATRICES
    return quantize_output and name == OUTPUT_HEAD


def scale_name(name: str) -> str:
    return name + quant.SCALE_SUFFIX


def in_dims(entry: hf_layout.Entry, config: InternLM2Config) -> int:
    """How many trailing jaxlm dims of the tensor make up HF's input dim (2 for ``wo``)."""
    hf_in = entry.rule.hf_shape(config)[-1]
    shape = entry.rule.jaxlm_shape(config)
    return next(n for n in range(1, len(shape) + 1) if math.prod(shape[len(shape) - n:]) == hf_in)


def expected(config: InternLM2Config, mode: str | None, quantize_output: bool = False,
             ) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """``name -> (shape, dtype name or None for 'the float dtype')`` of every stored tensor."""
    out = {}
    for entry in hf_layout.entries(config):
        name, shape = entry.jaxlm_name, entry.rule.jaxlm_shape(config)
        if mode is not None and is_quantized(name, quantize_output):
            out[name] = (shape, quant.STORAGE[mode].name)
            out[scale_name(name)] = (quant.scale_shape(shape, in_dims(entry, config), mode), "float32")
        else:
            out[name] = (shape, None)
    return out


def quantize_stream(config: InternLM2Config, named: Iterable[tuple[str, np.ndarray]], mode: str,
                    quantize_output: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """A stream of float jaxlm tensors with the quantized ones replaced by (int values, scales)."""
    entries = hf_layout.by_jaxlm_name(config)
    for name, array in named:
        if is_quantized(name, quantize_output):
            q, scale = quant.quantize(array, in_dims(entries[name], config), mode)
            yield name, q
            yield scale_name(name), scale
        else:
            yield name, array

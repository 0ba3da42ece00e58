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

from jaxlm.checkpoint import hf_layout, jaxlm_format
from jaxlm.checkpoint.hf_reader import SUPPORTED_DTYPES
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



def marker_mode(marker: dict) -> tuple[str | None, bool]:
    """(mode, quantize_output) recorded in a jaxlm checkpoint's marker (None for a float one)."""
    return marker.get("quantize"), bool(marker.get("quantize_output"))


def iter_dequantized(path: str, config: InternLM2Config, marker: dict) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, float array)`` of every tensor of a jaxlm checkpoint in `hf_layout` order, quantized
    ones dequantized to the checkpoint's float dtype (export and LoRA merging write full precision)."""
    mode, quantize_output = marker_mode(marker)
    entries = hf_layout.entries(config)
    if mode is None:
        yield from jaxlm_format.iter_arrays(path, [e.jaxlm_name for e in entries])
        return
    stored = jaxlm_format.stored_arrays(path)
    dtype = hf_layout_dtype(marker)
    for entry in entries:
        name = entry.jaxlm_name
        if not is_quantized(name, quantize_output):
            yield name, jaxlm_format.load_arrays(path, {name: np.empty(*stored[name])}, stored=stored)[name]
            continue
        pair = jaxlm_format.load_arrays(path, {n: np.empty(*stored[n]) for n in (name, scale_name(name))},
                                        stored=stored)
        yield name, quant.dequantize(pair[name], pair[scale_name(name)], in_dims(entry, config), mode,
                                     dtype=dtype)


def hf_layout_dtype(marker: dict) -> np.dtype:
    return np.dtype(SUPPORTED_DTYPES[marker["param_dtype"]])

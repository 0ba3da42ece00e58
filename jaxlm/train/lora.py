"""LoRA on the packed InternLM2 projections, exported in PEFT's layout.

Why not qwix or ``nnx.LoRA``: qwix finds the weight of a ``dot_general`` by
tracing operand provenance, which the reshaped 2-D weight views of
`jaxlm.nn.linear.Projection` hide; ``nnx.LoRA`` wraps ``nnx.Linear``. The
factors here live in the projection itself (``lora_a [r, *in]``,
``lora_b [*out, r]``, as ``nnx.LoRAParam``), keep logical axis names (so they
shard like their weight), and flatten to exactly PEFT's ``lora_A.weight
[r, in_features]`` / ``lora_B.weight [out_features, r]`` under the original
module names, so PEFT loads them onto the original PyTorch model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from jaxlm.errors import CheckpointError, ConfigError
from jaxlm.files import atomic_output_dir

TARGETS = ("wqkv", "wo", "w1", "w2", "w3")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"lora.targets: {bad or 'empty'}; choose among {TARGETS}")


def _hf_module(layer: int, name: str) -> str:
    sub = "attention" if name in ("wqkv", "wo") else "feed_forward"
    return f"model.layers.{layer}.{sub}.{name}"


def target_projections(model):
    """(name, projection) for every LoRA-able projection of the model's layers."""
    layers = model.model.layers
    stacked = model.options.scan_layers
    blocks = [layers] if stacked else list(layers)
    for block in blocks:
        yield block, {"wqkv": block.attention.wqkv, "wo": block.attention.wo, "w1": block.feed_forward.w1,
                      "w2": block.feed_forward.w2, "w3": block.feed_forward.w3}


def quantized_projections(model):
    """Every quantized projection of the model (the layers' matrices, and the head when quantized)."""
    out = [p for _, projections in target_projections(model) for p in projections.values() if p.quantize]
    head = getattr(model, "output", None)
    return out + ([head] if head is not None and head.quantize else [])


def apply_lora(model, cfg: LoRAConfig, seed: int = 0) -> None:
    """Adds LoRA factors to the target projections (in place)."""
    cfg.validate()
    rngs = nnx.Rngs(seed)
    for _, projections in target_projections(model):
        for name in cfg.targets:
            projections[name].add_lora(cfg.rank, cfg.alpha, cfg.dropout, rngs)


def _factors(model, cfg: LoRAConfig):
    """(hf module name, A [r, in], B [out, r]) as host arrays, layer by layer."""
    stacked = model.options.scan_layers
    for i, (_, projections) in enumerate(target_projections(model)):
        for name in cfg.targets:
            proj = projections[name]
            a, b = np.asarray(jax.device_get(proj.lora_a[...])), np.asarray(jax.device_get(proj.lora_b[...]))
            layers = range(a.shape[0]) if stacked else [i]
            for j, layer in enumerate(layers):
                al, bl = (a[j], b[j]) if stacked else (a, b)
                rank = al.shape[0]
                yield _hf_module(layer, name), al.reshape(rank, -1), bl.reshape(-1, rank)


def save_adapter(model, cfg: LoRAConfig, dst: str, *, base_model: str = "", overwrite: bool = False) -> str:
    """Writes ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout)."""
    from safetensors.numpy import save_file

    tensors = {}
    for module, a, b in _factors(model, cfg):
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.astype(np.float32)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": False, "use_dora": False,
    }
    with atomic_output_dir(dst, overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return dst


def read_adapter(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, {hf module: scale * B @ A}) from a PEFT adapter directory."""
    from safetensors.numpy import load_file

    cfg_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for f in (cfg_file, weights_file):
        if not os.path.isfile(f):
            raise CheckpointError(f"{path}: not a LoRA adapter directory ({os.path.basename(f)} missing)")
    with open(cfg_file, encoding="utf-8") as f:
        config = json.load(f)
    tensors = load_file(weights_file)
    scale = float(config["lora_alpha"]) / float(config["r"])
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors.get(key.replace("lora_A", "lora_B"))
        if b is None:
            raise CheckpointError(f"{weights_file}: {key} has no matching lora_B")
        deltas[module] = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return config, deltas


def merged_tensor(name: str, weight: np.ndarray, deltas: dict[str, np.ndarray]) -> np.ndarray:
    """An HF tensor with its adapter delta added (``W + scale * B @ A``), in its own dtype."""
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or module not in deltas:
        return weight
    return (weight.astype(np.float64) + deltas[module]).astype(weight.dtype)


def trainable_filter(lora: LoRAConfig):
    """What the optimizer updates: the adapters with LoRA, every parameter without."""
    return nnx.LoRAParam if lora.enabled else nnx.Param


def load_adapter(model, path: str) -> LoRAConfig:
    """Attaches a PEFT-layout adapter directory to ``model`` (adding LoRA factors as needed)."""
    from safetensors.numpy import load_file

    config, _ = read_adapter(path)
    cfg = LoRAConfig(enabled=True, rank=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=0.0,
                     targets=tuple(config["target_modules"]))
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    stacked = model.options.scan_layers
    for i, (_, projections) in enumerate(target_projections(model)):
        for name in cfg.targets:
            proj = projections[name]
            if proj.lora_a is None:
                proj.add_lora(cfg.rank, cfg.alpha, 0.0, nnx.Rngs(0))
            a_shape, b_shape = proj.lora_a[...].shape, proj.lora_b[...].shape
            layers = range(a_shape[0]) if stacked else [i]
            a_parts, b_parts = [], []
            for layer in layers:
                key = f"base_model.model.{_hf_module(layer, name)}"
                if f"{key}.lora_A.weight" not in tensors:
                    raise CheckpointError(f"{path}: adapter has no {key}.lora_A.weight")
                a_parts.append(tensors[f"{key}.lora_A.weight"])
                b_parts.append(tensors[f"{key}.lora_B.weight"])
            a = np.stack(a_parts) if stacked else a_parts[0]
            b = np.stack(b_parts) if stacked else b_parts[0]
            proj.lora_a.set_value(jax.numpy.asarray(a.reshape(a_shape), jax.numpy.float32))
            proj.lora_b.set_value(jax.numpy.asarray(b.reshape(b_shape), jax.numpy.float32))
            proj.lora_scale = cfg.alpha / cfg.rank
    return cfg

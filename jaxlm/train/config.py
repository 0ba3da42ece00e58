"""Experiment configs: typed, validated, overridable from the command line.

An experiment is a Python file with a ``config()`` function returning a
`TrainConfig`. ``--set key=value`` changes any field by its dotted name
(``steps=40``, ``optimizer.learning_rate=1e-4``, ``lora.rank=8``); the value
is parsed as the field's type, and an unknown key is an error that lists the
closest names.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import typing

from jaxlm.errors import ConfigError
from jaxlm.options import ModelOptions
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class ModelSection(ModelOptions):
    """Which model to train, and its `ModelOptions` (every option, validated there).

    The training defaults differ from inference's: float32 master weights and
    scanned layers (one compiled layer, whatever the depth).
    """

    name: str = "tiny"                 # a preset, "tiny" (the bundled default), or a checkpoint directory
    tokenizer: str | None = None       # default: the checkpoint's, or the bundled tiny one
    dtype: str | None = "float32"
    param_dtype: str | None = "float32"
    scan_layers: bool = True


@dataclasses.dataclass(frozen=True)
class DataSection:
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    format: str = "chat"               # chat | text
    seq_len: int = 512
    shuffle: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoRAConfig = LoRAConfig()
    mesh: str = "fsdp=-1"
    steps: int = 100
    global_batch: int = 8              # rows of seq_len tokens per optimizer step
    micro_batches: int = 1             # gradient accumulation
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0                # 0: never
    seed: int = 0
    strict: bool = False               # malformed data lines fail the run instead of being skipped

    def validate(self) -> "TrainConfig":
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.global_batch >= 1, f"global_batch must be >= 1, got {self.global_batch}")
        need(self.micro_batches >= 1 and self.global_batch % self.micro_batches == 0,
             f"micro_batches ({self.micro_batches}) must divide global_batch ({self.global_batch})")
        need(self.data.seq_len >= 8, f"data.seq_len must be >= 8, got {self.data.seq_len}")
        need(bool(self.data.train_files), "data.train_files is empty")
        need(self.data.format in ("chat", "text"), f"data.format must be chat or text, got {self.data.format!r}")
        need(self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.optimizer.learning_rate > 0, "optimizer.learning_rate must be > 0")
        need(self.model.quantize is None or self.lora.enabled,
             f"model.quantize={self.model.quantize!r}: a quantized base trains only through LoRA adapters "
             f"(QLoRA); set lora.enabled=true, or train the float model")
        if self.lora.enabled:
            self.lora.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ overrides
def _fields(cls, prefix="") -> dict[str, tuple]:
    """dotted name -> (owner class, field) for every leaf field."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_fields(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (kind, f)
    return out


def _parse(value: str, kind, key: str):
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return value
        if origin is tuple:
            items = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            return tuple(str(v) for v in items)
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"--set {key}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from None
    raise ConfigError(f"--set {key}: unsupported field type {kind}")


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    fields = _fields(TrainConfig)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--set: unknown config key {key!r}{hint}")
        kind, _ = fields[key]
        config = _replace_path(config, key.split("."), _parse(value.strip(), kind, key))
    return config


def _replace_path(obj, path, value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace_path(getattr(obj, path[0]), path[1:], value)})


def load_experiment(path: str, overrides: list[str] = ()) -> TrainConfig:
    """Runs ``config()`` of an experiment file and applies ``--set`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: experiment file not found")
    spec = importlib.util.spec_from_file_location(f"jaxlm_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"{path}: cannot load experiment ({type(e).__name__}: {e})") from None
    if not hasattr(module, "config"):
        raise ConfigError(f"{path}: an experiment file must define config()")
    config = module.config()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: config() must return a jaxlm.train.config.TrainConfig")
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda files: tuple(f if os.path.isabs(f) else os.path.normpath(os.path.join(base, f))
                                  for f in files)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, train_files=resolve(config.data.train_files), eval_files=resolve(config.data.eval_files)))
    return apply_overrides(config, list(overrides)).validate()

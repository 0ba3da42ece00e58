"""Generation defaults read from ``generation_config.json``."""

from __future__ import annotations

import dataclasses
import json
import os

from jaxlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_model_config(cls, config) -> "GenerationDefaults":
        return cls(eos_token_id=_as_tuple(config.eos_token_id), pad_token_id=config.pad_token_id,
                   bos_token_id=config.bos_token_id)

    @classmethod
    def load(cls, path: str, config) -> "GenerationDefaults":
        """``generation_config.json`` in ``path`` if present, else the model config's ids."""
        base = cls.from_model_config(config)
        file = os.path.join(path, "generation_config.json")
        if not os.path.isfile(file):
            return base
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{file}: invalid JSON ({e})") from None
        return cls(eos_token_id=_as_tuple(data["eos_token_id"]) if "eos_token_id" in data else base.eos_token_id,
                   pad_token_id=data.get("pad_token_id", base.pad_token_id),
                   bos_token_id=data.get("bos_token_id", base.bos_token_id))


def _as_tuple(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)

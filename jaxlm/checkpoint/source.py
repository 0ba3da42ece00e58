"""A model source, resolved once: what every entry point that takes a model (a path or an id) calls.

`resolve_source` turns a local HF, InternEvo Origin or jaxlm directory, or a hub
id (`jaxlm.checkpoint.hub`), into a `ModelSource`: the local directory (an id's
cached snapshot), which kind of checkpoint it holds, and the name to show.
``from_pretrained``, the ``jaxlm`` commands and ``jaxlm serve`` all go through it,
so an Origin directory (no ``config.json``: its config is derived from the
shards) or a hub id works wherever a model is taken. `model_config` is the
config alone, as the loader would build it, and also takes a preset name.
"""

from __future__ import annotations

import dataclasses
import os

from jaxlm.checkpoint import jaxlm_format
from jaxlm.checkpoint.hf_reader import HFCheckpoint, is_hf_checkpoint
from jaxlm.checkpoint.hub import parse_hub_id, resolve_model_path
from jaxlm.checkpoint.internevo import OriginCheckpoint, is_origin_checkpoint
from jaxlm.config import PRESETS, InternLM2Config
from jaxlm.errors import CheckpointError

KINDS = ("jaxlm", "origin", "hf")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    spec: str   # as the user gave it: a path or a hub id
    path: str   # the local directory
    kind: str   # one of KINDS

    @property
    def name(self) -> str:
        """A hub id as given (what ``jaxlm serve`` serves it as), else the directory's basename."""
        if not os.path.exists(self.spec) and parse_hub_id(self.spec) is not None:
            return self.spec
        return os.path.basename(os.path.normpath(self.path))

    def weights(self) -> HFCheckpoint:
        """The tensor reader of an HF or Origin source (HF names and layouts both)."""
        if self.kind == "origin":
            return OriginCheckpoint(self.path)
        if self.kind == "hf":
            return HFCheckpoint(self.path)
        raise CheckpointError(f"{self.path}: a jaxlm checkpoint, read by jaxlm_format, not as HF tensors")

    def config(self) -> InternLM2Config:
        """The config the loader builds the model from (an Origin directory's from its shards)."""
        if self.kind == "origin":
            return OriginCheckpoint(self.path).config
        return InternLM2Config.from_pretrained(self.path)


def _kind(path: str) -> str:
    # jaxlm first: its directories carry a config.json too; Origin before HF, as open_weights decides
    if jaxlm_format.is_jaxlm_checkpoint(path):
        return "jaxlm"
    if is_origin_checkpoint(path):
        return "origin"
    if is_hf_checkpoint(path):
        return "hf"
    raise CheckpointError(f"{path}: neither an HF checkpoint (model.safetensors, pytorch_model.bin "
                          f"or an index), an InternEvo one (model_tp0_pp0.pt ...) nor a jaxlm "
                          f"checkpoint ({jaxlm_format.MARKER})")


def resolve_source(spec: str, revision: str | None = None) -> ModelSource:
    """``spec`` (a local directory, or a hub id fetched into the hub's cache) as a `ModelSource`."""
    path = resolve_model_path(spec, revision)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected an HF, InternEvo or jaxlm checkpoint, "
                              f"or a hub id such as internlm/internlm2-chat-7b)")
    return ModelSource(spec, path, _kind(path))


def model_config(spec: str, revision: str | None = None) -> InternLM2Config:
    """The config of a preset name, a config.json file, or any model source.

    A hub id's config.json is fetched alone (no weights), unless the repository has
    none (an Origin upload), whose config needs the shards.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    if os.path.isfile(spec):
        return InternLM2Config.from_json_file(spec)
    if not os.path.exists(spec) and parse_hub_id(spec) is not None:
        folder = resolve_model_path(spec, revision, weights=False)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return InternLM2Config.from_pretrained(folder)
    return resolve_source(spec, revision).config()

"""Model hub ids as model sources: ``internlm/internlm2-chat-7b`` or
``modelscope:Shanghai_AI_Laboratory/internlm2-chat-7b``.

A source that is not a local path but reads as ``org/name`` (optionally
``@revision``) is fetched with the hub's own client (``huggingface_hub`` or
``modelscope``, both optional), which also keeps the download cache; only
config, tokenizer and weight files are fetched. ``HF_HUB_OFFLINE=1`` is read
at call time (huggingface_hub reads it at import), so setting it late works too.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jaxlm.errors import CheckpointError, JaxlmError

MODELSCOPE_PREFIX = "modelscope:"
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")

# What a model needs; remote code (*.py), READMEs and other weight formats stay on the hub.
CONFIG_AND_TOKENIZER = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                        "special_tokens_map.json", "tokenizer.json", "added_tokens.json"]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
FALLBACK_WEIGHTS = ["*.bin", "pytorch_model.bin.index.json", "model_config.pt", "model_tp*_pp*.pt",
                    "model_wp*_pp*.pt"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclasses.dataclass(frozen=True)
class HubId:
    hub: str            # "huggingface" or "modelscope"
    repo_id: str
    revision: str | None


def parse_hub_id(text: str) -> HubId | None:
    """``org/name[@rev]`` or ``modelscope:org/name[@rev]``; None for anything else."""
    hub = "huggingface"
    if text.startswith(MODELSCOPE_PREFIX):
        hub, text = "modelscope", text[len(MODELSCOPE_PREFIX):]
    m = _ID.match(text)
    if m is None or ".." in m.group("repo"):
        if hub == "modelscope":
            raise JaxlmError(f"{MODELSCOPE_PREFIX}{text}: not a ModelScope model id (expected "
                             f"modelscope:ORG/NAME[@REVISION])")
        return None
    return HubId(hub, m.group("repo"), m.group("revision"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).strip().upper() in \
        ("1", "ON", "YES", "TRUE")


def _has_weights(folder: str) -> bool:
    return any(name.endswith(_WEIGHT_SUFFIXES) for name in os.listdir(folder))


def _from_huggingface(ident: HubId, revision: str | None, weights: bool) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise JaxlmError(f"{ident.repo_id}: no such local path; loading it from the HuggingFace Hub needs "
                         f"huggingface_hub: pip install 'jaxlm[hub]'") from None
    offline = _offline()

    def fetch(patterns):
        return snapshot_download(ident.repo_id, revision=revision, allow_patterns=CONFIG_AND_TOKENIZER + patterns,
                                 local_files_only=offline)

    try:
        folder = fetch(SAFETENSORS if weights else [])
        if weights and not _has_weights(folder) and not offline:  # a repo with .bin (or Origin .pt) weights only
            folder = fetch(FALLBACK_WEIGHTS)
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1" if offline else "the Hub could not be reached"
        raise CheckpointError(f"{ident.repo_id}: not a local path, and not in the HuggingFace cache at revision "
                              f"{revision or 'main'} ({where})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{ident.repo_id}: the HuggingFace Hub has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{ident.repo_id}: not a local path, and no such (or no accessible) "
                              f"HuggingFace Hub repository") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{ident.repo_id}: download from the HuggingFace Hub failed "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return folder


def _from_modelscope(ident: HubId, revision: str | None, weights: bool) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise JaxlmError(f"{MODELSCOPE_PREFIX}{ident.repo_id}: loading from ModelScope needs the modelscope "
                         f"package: pip install 'jaxlm[modelscope]'") from None
    try:
        return snapshot_download(ident.repo_id, revision=revision or "master", allow_patterns=CONFIG_AND_TOKENIZER +
                                 (SAFETENSORS + FALLBACK_WEIGHTS if weights else []))
    except Exception as e:  # modelscope raises plain exceptions of many kinds
        raise CheckpointError(f"{MODELSCOPE_PREFIX}{ident.repo_id}: download from ModelScope failed "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def resolve_model_path(source: str, revision: str | None = None, *, weights: bool = True) -> str:
    """A local directory for ``source``: itself if it exists, else its hub snapshot.

    ``weights=False`` fetches only the config and tokenizer files (for a tokenizer or
    a config by id); a later full fetch of the same revision fills the same snapshot.
    Anything that is neither a local path nor a hub id comes back unchanged, so the
    caller's own "not a directory" error names it.
    """
    if os.path.exists(source):
        return source
    ident = parse_hub_id(source)
    if ident is None:
        return source
    if revision is not None and ident.revision is not None and revision != ident.revision:
        raise JaxlmError(f"{source}: revision {ident.revision!r} in the id and revision={revision!r} disagree")
    revision = revision or ident.revision
    if ident.hub == "modelscope":
        return _from_modelscope(ident, revision, weights)
    return _from_huggingface(ident, revision, weights)

"""HF checkpoint -> InternEvo "Origin" checkpoint: the files InternEvo saves and loads.

`write_origin` splits an HF (or Origin) checkpoint the way InternEvo's uniform
pipeline partition and linear layers split it (`internevo_layout`), one
rank's file at a time, each tensor read as just that rank's slice.
"""

from __future__ import annotations

import os

import numpy as np

from jaxlm.checkpoint import hf_layout
from jaxlm.checkpoint.internevo import open_weights
from jaxlm.checkpoint.internevo_config import CONFIG_FILE, origin_config_for
from jaxlm.checkpoint.internevo_layout import EMBEDDING_KEYS, shard_name, shard_shapes, split_dims, stage_layers
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.files import atomic_output_dir, check_destination


def _origin_key(entry: hf_layout.Entry, local_layer: int | None) -> tuple[str, str]:
    """(key in the rank's state dict, Origin suffix) of an HF entry.

    Keys carry ``model.``: InternEvo saves and loads the state dict of its NaiveAMPModel
    wrapper, whose ``model`` attribute is the network.
    """
    name = entry.hf_name
    if entry.layer is None:
        key = name.removeprefix("model.")
        return f"model.{key}", "embedding" if key in EMBEDDING_KEYS else key
    suffix = name.split(".", 3)[3]
    return f"model.layers.{local_layer}.{suffix}", suffix


def _to_torch(array: np.ndarray):
    import ml_dtypes
    import torch

    owned = np.array(array, copy=True, order="C")  # a view would save its whole base tensor
    if owned.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(owned.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(owned)


def write_origin(src: str, dst: str, *, tp: int, pp: int, overwrite: bool = False) -> dict:
    """Writes ``model_tp{t}_pp{p}.pt`` for every t < tp, p < pp plus ``model_config.pt`` to ``dst``.

    One rank's file is built at a time, each tensor read as just that rank's slice.
    """
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise JaxlmError(f"{flag}: must be a positive integer, got {value!r}")
    check_destination(dst, overwrite)
    try:
        import torch
    except ImportError:
        raise JaxlmError("writing InternEvo checkpoints needs PyTorch; install it with "
                         "`pip install 'jaxlm[torch]'`") from None
    reader = open_weights(src)
    c = reader.config
    entries = reader.validate()
    layers = stage_layers(c.num_hidden_layers, pp)
    try:
        shard_shapes(c, tp, "tp", embed_dim=1)
    except CheckpointError as e:
        raise JaxlmError(f"--tp {tp}: {e}") from None
    dims = split_dims("tp", embed_dim=1)
    stage_of = lambda e: (0 if "tok_embeddings" in e.hf_name else pp - 1) if e.layer is None else \
        next(s for s, r in enumerate(layers) if e.layer in r)
    dtype = reader.checkpoint_dtype()
    files, nbytes = [], 0
    with atomic_output_dir(dst, overwrite) as tmp:
        for stage in range(pp):
            members = [e for e in entries if stage_of(e) == stage]
            for rank in range(tp):
                state = {}
                for entry in members:
                    key, suffix = _origin_key(entry, None if entry.layer is None else
                                              entry.layer - layers[stage].start)
                    dim = dims[suffix]
                    if dim is None:
                        piece = reader.read(entry.hf_name)
                    else:
                        size = reader.shape(entry.hf_name)[dim] // tp
                        piece = reader.read(entry.hf_name, (slice(None),) * dim +
                                            (slice(rank * size, (rank + 1) * size),))
                    state[key] = _to_torch(piece)
                    nbytes += piece.nbytes
                name = shard_name("tp", rank, stage)
                torch.save(state, os.path.join(tmp, name))
                files.append(name)
        torch.save(origin_config_for(c, getattr(torch, dtype)), os.path.join(tmp, CONFIG_FILE))
    return {"dst": dst, "files": files, "bytes": nbytes, "dtype": dtype}

"""Running the network on concrete arrays: the compiled forward, meshes, chunked logits.

``model(input_ids, ...)`` lands here (`call`). With concrete arrays it runs
one cached jitted program per (model structure, shapes, chunk size, axis
rules); inside a user's own ``jit``/``grad`` it traces the network directly.
On a mesh the rows are split over the batch axes, padded up to a multiple
of them and the padding dropped again.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.arrays import pad_axis, round_up
from jaxlm.runtime.chunked import init_caches, run_chunks
from jaxlm.sharding import ACT, batch_multiple, jit_with_rules, model_mesh, named_sharding


def mesh_context(mesh):
    """``jax.set_mesh(mesh)``, or nothing for a model on one device."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def logits(model, input_ids, attention_mask=None, position_ids=None, segment_ids=None, chunk_size=None):
    """Traceable float32 logits ``[B, T, V]``; with ``chunk_size``, through a KV cache that many tokens at a time."""
    if chunk_size:
        return chunked_logits(model, input_ids, attention_mask, position_ids, segment_ids, int(chunk_size))
    return model.forward(input_ids, attention_mask, position_ids, segment_ids)


def chunked_logits(model, input_ids, attention_mask, position_ids, segment_ids, chunk: int):
    """The full-sequence logits computed ``chunk`` tokens at a time (memory ~ chunk x context).

    Equal to the one-shot forward: the rotary base is fixed for the whole
    sequence and each chunk reads the cache up to itself, with the same
    padding and segment masks.
    """
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    positions = model.positions(input_ids, attention_mask, position_ids)
    n = -(-T // chunk)
    caches = init_caches(model, B, n * chunk, jnp.dtype(model.options.dtype))
    logits0 = jnp.zeros((n, B, chunk, model.config.vocab_size), jnp.float32)
    collect = lambda c, hidden, out: out.at[c].set(model.logits(hidden))
    key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    _, out = run_chunks(model, input_ids, positions, caches, chunk=chunk, rope_len=jnp.max(positions) + 1,
                        collect=collect, init=logits0, key_valid=key_valid,
                        segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, -1)[:, :T]


# Plain jit over (graphdef, state): nnx.jit would return the module state as
# outputs, i.e. copy every weight on every call.
@jit_with_rules(static_argnames=("graphdef", "chunk_size"))
def _compiled_logits(graphdef, state, input_ids, attention_mask, position_ids, segment_ids, chunk_size=None):
    return logits(nnx.merge(graphdef, state), input_ids, attention_mask, position_ids, segment_ids, chunk_size)


def call(model, input_ids, attention_mask=None, position_ids=None, segment_ids=None, chunk_size=None):
    """``model(...)``: traced directly inside a transformation, else the cached compiled forward."""
    args = (input_ids, attention_mask, position_ids, segment_ids)
    if any(isinstance(a, jax.core.Tracer) for a in args):
        return logits(model, *args, chunk_size=chunk_size)
    graphdef, state = nnx.split(model)
    mesh = model_mesh(model)
    if mesh is None:
        return _compiled_logits(graphdef, state, *args, chunk_size=chunk_size)
    rows = np.asarray(input_ids).shape[0]
    padded = round_up(rows, batch_multiple(mesh))
    sharding = named_sharding(mesh, ACT["tokens"])
    # Padding rows get an attention mask of ones (a row with no valid key has nothing to read).
    placed = [None if a is None else jax.device_put(pad_axis(np.asarray(a), 0, padded, int(i == 1)), sharding)
              for i, a in enumerate(args)]
    with jax.set_mesh(mesh):
        return _compiled_logits(graphdef, state, *placed, chunk_size=chunk_size)[:rows]

"""Running a stack of identical layers: unrolled, or scanned over stacked weights.

Scanning compiles one layer instead of N, which keeps compile time flat for
deep models; unrolled layers keep per-layer weights, which decode faster on
CPU (slicing stacked weights inside a jitted decode step measured 4x slower).
Both are kept, chosen by ``ModelOptions.scan_layers``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.nn.params import add_leading_axis

_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """One module whose parameters carry a leading ``layers`` axis of size ``num``."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(r):
        return make_layer(r)

    stacked = build(rngs)
    add_leading_axis(stacked, "layers")
    return stacked


def _maybe_remat(fn, remat: str, scanned: bool):
    if remat == "none":
        return fn
    # Outside a scan, XLA's CSE would merge the recomputation with the forward
    # pass (undoing the remat) unless prevented; inside a scan it cannot.
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[remat], prevent_cse=not scanned)


def run_layers(layers, x, layer_fn: Callable[[nnx.Module, Any, Any, Any], tuple[Any, Any]], *,
               per_layer=None, caches=None, scanned: bool, remat: str = "none"):
    """Threads ``x`` through every layer: ``x, cache_i = layer_fn(layer_i, x, per_layer_i, cache_i)``.

    ``per_layer`` holds read-only per-layer inputs (e.g. dropout keys) and
    ``caches`` per-layer state that each layer updates (KV caches): lists for
    unrolled layers, pytrees with a leading layer axis for scanned ones.
    Scanned caches ride in the loop carry and are updated in place at the
    layer's index: as scan outputs they would need a second full copy.
    Returns ``(x, caches)``.
    """
    if scanned:
        graphdef, state = nnx.split(layers)
        count = jax.tree.leaves(state)[0].shape[0]

        def body(carry, xs):
            h, all_caches = carry
            layer_state, extra, i = xs
            cache = None if all_caches is None else jax.tree.map(
                lambda c: jax.lax.dynamic_index_in_dim(c, i, 0, keepdims=False), all_caches)
            h, new = layer_fn(nnx.merge(graphdef, layer_state), h, extra, cache)
            if all_caches is not None:
                all_caches = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, i, 0),
                                          all_caches, new)
            return (h, all_caches), None

        (x, caches), _ = jax.lax.scan(_maybe_remat(body, remat, True), (x, caches),
                                      (state, per_layer, jnp.arange(count)))
        return x, caches

    outs = []
    for i, layer in enumerate(layers):
        extra = None if per_layer is None else per_layer[i]
        cache = None if caches is None else caches[i]
        if remat == "none":
            x, out = layer_fn(layer, x, extra, cache)
        else:
            graphdef, state = nnx.split(layer)
            x, out = _maybe_remat(lambda s, h, e, c: layer_fn(nnx.merge(graphdef, s), h, e, c), remat, False)(
                state, x, extra, cache)
        outs.append(out)
    return x, (None if caches is None else outs)

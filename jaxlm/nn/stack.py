"""Running a stack of identical layers: unrolled, or scanned over stacked weights.

Scanning compiles one layer instead of N, which keeps compile time flat for
deep models; unrolled layers keep per-layer weights, which decode faster on
CPU (slicing stacked weights inside a jitted decode step measured 4x slower).
Both are kept, chosen by ``ModelOptions.scan_layers``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
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


def run_layers(layers, x, layer_fn: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
               per_layer=None, *, scanned: bool, remat: str = "none"):
    """Threads ``x`` through every layer: ``x, out_i = layer_fn(layer_i, x, per_layer_i)``.

    ``per_layer`` holds per-layer inputs (e.g. KV caches): a sequence for
    unrolled layers, a pytree with a leading layer axis for scanned ones.
    Returns ``(x, outs)`` with ``outs`` in the same form as ``per_layer``.
    """
    if scanned:
        graphdef, state = nnx.split(layers)

        def body(carry, xs):
            layer_state, extra = xs
            return layer_fn(nnx.merge(graphdef, layer_state), carry, extra)

        return jax.lax.scan(_maybe_remat(body, remat, True), x, (state, per_layer))

    outs = []
    for i, layer in enumerate(layers):
        extra = None if per_layer is None else per_layer[i]
        if remat == "none":
            x, out = layer_fn(layer, x, extra)
        else:
            graphdef, state = nnx.split(layer)
            x, out = _maybe_remat(lambda s, h, e: layer_fn(nnx.merge(graphdef, s), h, e), remat, False)(
                state, x, extra)
        outs.append(out)
    return x, (None if all(o is None for o in outs) else outs)

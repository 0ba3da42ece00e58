"""Array helpers shared by the kernels, the attention cores and the runtime."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x, axis: int, length: int, value=0):
    """``x`` padded with ``value`` along ``axis`` up to ``length``; None stays None.

    Host arrays stay NumPy (they are placed on devices afterwards, shard by
    shard); anything else goes through ``jnp.pad``.
    """
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    pad = np.pad if isinstance(x, np.ndarray) else jnp.pad
    return pad(x, widths, constant_values=value)

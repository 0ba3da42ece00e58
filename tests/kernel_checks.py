"""What the kernel tests compare with: tolerances by dtype and the relative error they bound."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), "non-finite values: an output element was never written"
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))

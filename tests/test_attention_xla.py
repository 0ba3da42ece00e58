"""The XLA attention paths against a direct float64 reference."""

import numpy as np
import pytest

from jaxlm.nn.attention import make_attention_mask, xla_attention, xla_decode_attention


def reference(q, k, v, mask):
    B, T, K, G, D = q.shape
    s = np.einsum("btkgd,bskd->bkgts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(D)
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskd->btkgd", p, v.astype(np.float64))


@pytest.mark.parametrize("T, S, segments", [(300, 300, False), (300, 420, False), (260, 260, True)])
def test_causal_blocking_is_exact(T, S, segments):
    rng = np.random.default_rng()
    q = rng.standard_normal((2, T, 2, 3, 16), np.float32)
    k = rng.standard_normal((2, S, 2, 16), np.float32)
    v = rng.standard_normal((2, S, 2, 16), np.float32)
    seg = np.sort(rng.integers(0, 3, (2, T)), axis=1) if segments else None
    mask = np.asarray(make_attention_mask(T, S, q_offset=S - T, q_segment=seg, kv_segment=seg))
    blocked = np.asarray(xla_attention(q, k, v, mask, causal_offset=S - T))
    plain = np.asarray(xla_attention(q, k, v, mask))
    np.testing.assert_allclose(blocked, plain, atol=1e-5)
    np.testing.assert_allclose(blocked, reference(q, k, v, mask), atol=1e-4)


def test_decode_attention_masks_by_length():
    rng = np.random.default_rng()
    B, S, K, G, D = 3, 40, 2, 4, 16
    q = rng.standard_normal((B, K * G, D), np.float32)
    kc = rng.standard_normal((B, S, K, D), np.float32)
    vc = rng.standard_normal((B, S, K, D), np.float32)
    lengths = np.array([1, 17, S])
    out = np.asarray(xla_decode_attention(q, kc, vc, lengths))
    mask = (np.arange(S)[None, None, :] < lengths[:, None, None])
    expected = reference(q.reshape(B, 1, K, G, D), kc, vc, mask)[:, 0].reshape(B, K * G, D)
    np.testing.assert_allclose(out, expected, atol=1e-4)

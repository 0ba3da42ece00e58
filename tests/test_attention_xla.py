"""The XLA attention paths against a direct float64 reference."""

import dataclasses

import numpy as np
import pytest

from jaxlm.nn.attention import AttentionMask, blockwise_attention, xla_attention, xla_decode_attention


def reference(q, k, v, mask):
    B, T, K, G, D = q.shape
    s = np.einsum("btkgd,bskd->bkgts", q.astype(np.float64), k.astype(np.float64)) / np.sqrt(D)
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskd->btkgd", p, v.astype(np.float64))


@pytest.mark.parametrize("T, S, segments, lengths", [(300, 300, False, False), (300, 420, False, True),
                                                     (260, 260, True, False)])
def test_causal_blocking_and_blockwise_are_exact(T, S, segments, lengths, rng):
    q = rng.standard_normal((2, T, 2, 3, 16), np.float32)
    k = rng.standard_normal((2, S, 2, 16), np.float32)
    v = rng.standard_normal((2, S, 2, 16), np.float32)
    seg = np.sort(rng.integers(0, 3, (2, T)), axis=1) if segments else None
    key_lengths = np.array([S - 7, S]) if lengths else None
    mask = AttentionMask(S, True, S - T, key_lengths, None, seg, seg)
    dense = np.broadcast_to(np.asarray(mask.dense(T)), (2, T, S))
    expected = reference(q, k, v, dense)
    valid = dense.any(-1)  # rows with no key at all are garbage in every implementation
    for out in (xla_attention(q, k, v, mask),
                xla_attention(q, k, v, dataclasses.replace(mask, q_offset=np.int32(S - T))),
                blockwise_attention(q, k, v, mask, q_block=64, k_block=96)):
        np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], atol=1e-4)


def test_blockwise_gradients_match_dense(rng):
    import jax

    q = rng.standard_normal((1, 200, 2, 2, 16), np.float32)
    k = rng.standard_normal((1, 200, 2, 16), np.float32)
    v = rng.standard_normal((1, 200, 2, 16), np.float32)
    seg = np.sort(rng.integers(0, 2, (1, 200)), axis=1)
    mask = AttentionMask(200, True, 0, None, None, seg, seg)
    f = lambda fn: jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    dense = f(lambda q, k, v: xla_attention(q, k, v, mask))
    block = f(lambda q, k, v: blockwise_attention(q, k, v, mask, q_block=64, k_block=48))
    for a, b in zip(dense, block):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-3, rtol=1e-3)


def test_decode_attention_masks_by_length(rng):
    B, S, K, G, D = 3, 40, 2, 4, 16
    q = rng.standard_normal((B, K * G, D), np.float32)
    kc = rng.standard_normal((B, S, K, D), np.float32)
    vc = rng.standard_normal((B, S, K, D), np.float32)
    lengths = np.array([1, 17, S])
    out = np.asarray(xla_decode_attention(q, kc, vc, lengths))
    mask = (np.arange(S)[None, None, :] < lengths[:, None, None])
    expected = reference(q.reshape(B, 1, K, G, D), kc, vc, mask)[:, 0].reshape(B, K * G, D)
    np.testing.assert_allclose(out, expected, atol=1e-4)

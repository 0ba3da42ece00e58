"""Parity with an independent PyTorch InternLM2 on settings the golden files lack.

The oracle (tests/reference_internlm2.py) is itself checked against the
shared golden logits first.
"""

import numpy as np
import pytest

import torch  # noqa: E402  (the test extra installs it)

from jaxlm import InternLM2ForCausalLM  # noqa: E402
from reference_internlm2 import load_reference  # noqa: E402

TOL = 1e-4


def run_reference(path, ids, mask=None):
    ref = load_reference(path)
    with torch.no_grad():
        out = ref(torch.tensor(ids), None if mask is None else torch.tensor(mask))
    return out.numpy()


def batch(vocab, rng, b=2, t=24, pad=(0, 5)):
    ids = rng.integers(0, vocab, (b, t))
    mask = np.ones((b, t), np.int64)
    for row, n in enumerate(pad[:b]):
        mask[row, :n] = 0
    return ids, mask


def test_oracle_matches_golden(golden):
    for case in ["tiny_gqa", "tiny_dynamic_ntk", "tiny_left_padded"]:
        ref = np.load(golden(case) / "golden.npz")
        out = run_reference(str(golden(case)), ref["input_ids"], ref["attention_mask"])
        valid = ref["attention_mask"].astype(bool)
        assert np.abs(out - ref["logits"])[valid].max() <= 1e-4, case


SETTINGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa8": dict(num_attention_heads=8, num_key_value_heads=1, hidden_size=64),
    "linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "dynamic_long": dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "bias": dict(bias=True),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_settings_match_reference(make_hf_checkpoint, rng, setting, scan):
    path = make_hf_checkpoint(**SETTINGS[setting])
    ids, mask = batch(256, rng, t=24)
    expected = run_reference(path, ids, mask)
    model = InternLM2ForCausalLM.from_pretrained(path, scan_layers=scan)
    got = np.asarray(model(ids, mask))
    valid = mask.astype(bool)
    assert np.abs(got - expected)[valid].max() <= TOL


@pytest.mark.parametrize("fmt, dtype, shard", [
    ("bin", "float32", None),
    ("bin", "bfloat16", 40_000),
    ("safetensors", "bfloat16", 40_000),
    ("safetensors", "float16", None),
])
def test_checkpoint_formats(make_hf_checkpoint, rng, fmt, dtype, shard):
    path = make_hf_checkpoint(fmt=fmt, dtype=dtype, max_shard_bytes=shard)
    ids, mask = batch(256, rng, t=16)
    expected = run_reference(path, ids, mask)  # the oracle upcasts the same stored weights
    model = InternLM2ForCausalLM.from_pretrained(path, dtype="float32", param_dtype="float32")
    got = np.asarray(model(ids, mask))
    assert np.abs(got - expected)[mask.astype(bool)].max() <= TOL


def test_left_padded_rows_equal_unpadded(make_hf_checkpoint, rng):
    path = make_hf_checkpoint()
    model = InternLM2ForCausalLM.from_pretrained(path)
    ids, mask = batch(256, rng, b=3, t=20, pad=(0, 3, 11))
    full = np.asarray(model(ids, mask))
    for row in range(3):
        n = int(mask[row].sum())
        alone = np.asarray(model(ids[row:row + 1, -n:]))[0]
        np.testing.assert_allclose(full[row, -n:], alone, atol=TOL, rtol=0)


def test_inside_user_jit_and_grad(make_hf_checkpoint):
    import jax
    from flax import nnx

    model = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint())
    ids = np.arange(12).reshape(1, 12)

    @nnx.jit
    def loss(m, x):
        return m(x)[:, :-1].mean()

    grads = nnx.grad(lambda m: loss(m, ids))(model)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    np.testing.assert_allclose(loss(model, ids), np.asarray(model(ids))[:, :-1].mean(), rtol=0, atol=1e-6)

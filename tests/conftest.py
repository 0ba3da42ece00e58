"""Shared fixtures: the session seed (JAXLM_TEST_SEED), the ground-truth folder and tiny synthetic checkpoints."""

from __future__ import annotations

import os
import pathlib

# Eight simulated CPU devices for the mesh tests; set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()

import gc

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- the seed
def _session_seed() -> int:
    """JAXLM_TEST_SEED (default 0); "random" draws a fresh one (printed, so it can be replayed)."""
    raw = os.environ.get("JAXLM_TEST_SEED", "0").strip()
    if raw.lower() == "random":
        return int(np.random.SeedSequence().entropy % 2**31)
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"JAXLM_TEST_SEED must be an integer or 'random', got {raw!r}") from None


SEED = _session_seed()


def pytest_report_header(config):
    return f"jaxlm test seed: {SEED} (rerun with JAXLM_TEST_SEED={SEED}; JAXLM_TEST_SEED=random draws one)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("jaxlm test seed", f"JAXLM_TEST_SEED={SEED}  (reproduce with "
                                                   f"JAXLM_TEST_SEED={SEED} python -m pytest {item.nodeid!r})"))


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops every compiled program and traced function after each test module.

    One pytest process runs the whole suite; jit caches are global, so without this the
    programs of every module stay resident (hundreds of XLA:CPU executables, each with
    its constants) and the process grows toward the 24 GB of a CI machine, where an
    XLA compile then aborts. Modules share few programs, so little is compiled twice.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def seed() -> int:
    """The session's seed: every random test draws from it."""
    return SEED


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A fresh ``np.random.default_rng(seed)`` for each test."""
    return np.random.default_rng(seed)


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXLM_SHARED", REPO.parent / "shared"))


def require_shared(*parts: str) -> pathlib.Path:
    """A path under ../shared; missing fails under CI=true, else skips."""
    path = shared_dir().joinpath(*parts)
    if not path.exists():
        message = f"shared file missing: {path} (set JAXLM_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def golden():
    return lambda case: require_shared("golden", case)


def tiny_config(**overrides):
    from jaxlm import InternLM2Config

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_theta=10000.0, rms_norm_eps=1e-5, bias=False, tie_word_embeddings=False,
                extra={"architectures": ["InternLM2ForCausalLM"]})
    base.update(overrides)
    return InternLM2Config(**base)


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory):
    """Writes a random HF-layout checkpoint; cached per argument set."""
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint

    cache = {}

    def make(*, dtype="float32", fmt="safetensors", max_shard_bytes=None, seed=0, **overrides):
        key = (dtype, fmt, max_shard_bytes, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            dst = tmp_path_factory.mktemp("hf")
            cache[key] = write_hf_checkpoint(str(dst), tiny_config(**overrides), seed=seed, dtype=dtype,
                                             fmt=fmt, max_shard_bytes=max_shard_bytes)
        return cache[key]

    return make

"""Converters: bit-exact round trips, and every bad input refused cleanly."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes  # noqa: F401
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import REPO
from jaxlm import InternLM2ForCausalLM
from jaxlm.checkpoint.convert import hf_to_jaxlm, jaxlm_to_hf


def hf_tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def assert_bit_exact(a, b):
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert ta[name].tobytes() == tb[name].tobytes(), name


@pytest.mark.parametrize("dtype, shard", [("float32", None), ("bfloat16", 30_000)])
def test_round_trip_is_bit_exact(make_hf_checkpoint, tmp_path, dtype, shard):
    src = make_hf_checkpoint(dtype=dtype, max_shard_bytes=shard, bias=True)
    hf_to_jaxlm(src, str(tmp_path / "j"))
    info = jaxlm_to_hf(str(tmp_path / "j"), str(tmp_path / "h"), max_shard_size=shard or "5GB")
    assert_bit_exact(src, tmp_path / "h")
    assert (len(info["files"]) > 1) == (shard is not None)
    if shard:
        index = json.loads((tmp_path / "h" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(hf_tensors(src))
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(src).values())
    out_cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert out_cfg["model_type"] == "internlm2" and out_cfg["torch_dtype"] == dtype


def test_golden_round_trip_and_sidecar_files(golden, tmp_path):
    src = golden("tiny_chat_realvocab")
    hf_to_jaxlm(str(src), str(tmp_path / "j"))
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "j" / name).read_bytes() == (src / name).read_bytes()
    jaxlm_to_hf(str(tmp_path / "j"), str(tmp_path / "h"), max_shard_size="12MB")
    assert_bit_exact(src, tmp_path / "h")
    assert (tmp_path / "h" / "tokenizer.model").exists()


def test_export_loads_into_pytorch_with_original_names(make_hf_checkpoint, tmp_path):
    import torch
    from reference_internlm2 import load_reference

    src = make_hf_checkpoint(num_key_value_heads=1)
    hf_to_jaxlm(src, str(tmp_path / "j"))
    jaxlm_to_hf(str(tmp_path / "j"), str(tmp_path / "h"))
    ref = load_reference(str(tmp_path / "h"))  # load_state_dict(strict=True)
    ids = np.arange(10).reshape(1, 10)
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).numpy()
    got = np.asarray(InternLM2ForCausalLM.from_pretrained(str(tmp_path / "j"))(ids))
    assert np.abs(got - expected).max() < 1e-4


def test_dtype_cast_and_save_pretrained(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint()
    hf_to_jaxlm(src, str(tmp_path / "j"), dtype="bfloat16")
    model = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "j"), scan_layers=True)
    assert model.options.param_dtype == np.dtype(ml_dtypes.bfloat16)
    model.save_pretrained(str(tmp_path / "again"))
    jaxlm_to_hf(str(tmp_path / "again"), str(tmp_path / "h"))
    original = hf_tensors(src)
    for name, value in hf_tensors(tmp_path / "h").items():
        assert value.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(value, original[name].astype(ml_dtypes.bfloat16))


def test_scanned_load_compiles_once_per_shape_not_per_layer(make_hf_checkpoint, tmp_path):
    """Filling stacked layers reuses one compiled update per (shape, dtype, sharding): the
    layer index is traced, so a deeper model adds no compilations; the result equals the
    unscanned load, from both HF and jaxlm sources."""
    from flax import nnx

    from jaxlm.checkpoint import loading

    ids = np.arange(3, 15).reshape(1, 12)
    compiles = {}
    for layers in (1, 4):
        hf = make_hf_checkpoint(num_hidden_layers=layers)
        hf_to_jaxlm(hf, str(tmp_path / f"j{layers}"))
        for source in (hf, str(tmp_path / f"j{layers}")):
            loading._set_layer.clear_cache()
            scanned = InternLM2ForCausalLM.from_pretrained(source, scan_layers=True)
            compiles[layers, source == hf] = loading._set_layer._cache_size()
            if layers == 4:
                plain = InternLM2ForCausalLM.from_pretrained(source)
                stacked = nnx.state(scanned.model.layers, nnx.Param)
                for i, layer in enumerate(plain.model.layers):
                    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(nnx.state(layer, nnx.Param))):
                        np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))
                np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(plain(ids)), atol=1e-5, rtol=0)
    n_stacked = len(jax.tree.leaves(nnx.state(scanned.model.layers, nnx.Param)))
    for from_hf in (True, False):
        assert 0 < compiles[4, from_hf] == compiles[1, from_hf] <= n_stacked


def test_iter_arrays_reads_the_metadata_once(make_hf_checkpoint, tmp_path, monkeypatch):
    from jaxlm.checkpoint import hf_layout, jaxlm_format
    from jaxlm.checkpoint.hf_reader import HFCheckpoint

    src = make_hf_checkpoint()
    hf_to_jaxlm(src, str(tmp_path / "j"))
    reads = []
    original = jaxlm_format.tree_metadata
    monkeypatch.setattr(jaxlm_format, "tree_metadata", lambda path: reads.append(path) or original(path))
    reader = HFCheckpoint(src)
    entries = hf_layout.entries(reader.config)
    arrays = dict(jaxlm_format.iter_arrays(str(tmp_path / "j"), [e.jaxlm_name for e in entries]))
    assert len(reads) == 1 and len(arrays) == len(entries) > 1
    for e in entries:
        np.testing.assert_array_equal(arrays[e.jaxlm_name], reader.read_jaxlm(e))


# ------------------------------------------------------------------ bad inputs

def run_cli(module, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"checkpoints_convert.{module}", *args],
                          capture_output=True, text=True, env=env, cwd=REPO)


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def break_missing_config(d):
    os.remove(d / "config.json")
    return "config.json"


def break_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    return "model_type is 'llama'"


def shards(d, ext="safetensors"):
    return sorted(p.name for p in d.iterdir() if p.name.endswith("." + ext))


def break_truncate_shard(d):
    name = shards(d)[1]
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    return name


def break_corrupt_header(d):
    name = shards(d)[0]
    data = bytearray((d / name).read_bytes())
    data[8:20] = b"not json!!!!"
    (d / name).write_bytes(bytes(data))
    return name


def break_index_missing_shard(d):
    name = shards(d)[-1]
    os.remove(d / name)
    return name


def break_shape(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.feed_forward.w2.weight"
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, shard, metadata={"format": "pt"})
    return f"{name}' has shape (64, 95), but the config implies (64, 96)"


def break_dtype(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    shard = d / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, shard, metadata={"format": "pt"})
    return "unsupported dtype int32"


BREAKS = [break_missing_config, break_model_type, break_truncate_shard, break_corrupt_header,
          break_index_missing_shard, break_shape, break_dtype]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_bad_input_is_one_clear_line(make_hf_checkpoint, tmp_path, breaker):
    src = copy_checkpoint(make_hf_checkpoint(max_shard_bytes=100_000), tmp_path / "src")
    assert len(shards(src)) >= 3
    expected = breaker(src)
    dst = tmp_path / "out"
    result = run_cli("hf_to_jaxlm", "--src", str(src), "--dst", str(dst))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not dst.exists()
    assert os.listdir(tmp_path) == ["src"]  # no temporary directory left behind


def test_non_empty_destination_is_refused_and_untouched(make_hf_checkpoint, tmp_path):
    src = make_hf_checkpoint()
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    result = run_cli("hf_to_jaxlm", "--src", src, "--dst", str(dst))
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    ok = run_cli("hf_to_jaxlm", "--src", src, "--dst", str(dst), "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert not (dst / "keep.txt").exists() and (dst / "params").is_dir()
    back = run_cli("jaxlm_to_hf", "--src", str(dst), "--dst", str(dst))
    assert back.returncode != 0 and "not empty" in back.stderr


def test_jaxlm_to_hf_rejects_non_checkpoint_and_bad_size(tmp_path, make_hf_checkpoint):
    result = run_cli("jaxlm_to_hf", "--src", make_hf_checkpoint(), "--dst", str(tmp_path / "o"))
    assert result.returncode != 0 and "not a jaxlm checkpoint" in result.stderr
    hf_to_jaxlm(make_hf_checkpoint(), str(tmp_path / "j"))
    result = run_cli("jaxlm_to_hf", "--src", str(tmp_path / "j"), "--dst", str(tmp_path / "o"),
                     "--max-shard-size", "lots")
    assert result.returncode != 0 and "--max-shard-size" in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_bin_shard_and_unsupported_dtype_flag(make_hf_checkpoint, tmp_path):
    src = copy_checkpoint(make_hf_checkpoint(fmt="bin", max_shard_bytes=100_000), tmp_path / "src")
    name = shards(src, "bin")[1]
    os.remove(src / name)
    result = run_cli("hf_to_jaxlm", "--src", str(src), "--dst", str(tmp_path / "o"))
    assert result.returncode != 0 and name in result.stderr
    result = run_cli("hf_to_jaxlm", "--src", str(src), "--dst", str(tmp_path / "o"), "--dtype", "int8")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --dtype: unsupported dtype 'int8'; use float32 or bfloat16"]

"""InternEvo "Origin" checkpoints: imports equal the golden logits, HF -> Origin -> HF is
bit-exact, and every bad input is one clear line.

The Origin fixtures are built here the way InternEvo saves them (torch.chunk per rank,
layers numbered per stage, its pickled ``Config``), independently of jaxlm's writer.
"""

import contextlib
import importlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import types

import ml_dtypes  # noqa: F401
import numpy as np
import pytest
import torch

from conftest import REPO
from jaxlm import ConfigError, InternLM2Config, InternLM2ForCausalLM
from jaxlm.checkpoint.hf_reader import HFCheckpoint
from jaxlm.checkpoint.internevo_config import is_interleaved, read_origin_config
from jaxlm.checkpoint.internevo_layout import stage_layers
from jaxlm.checkpoint.source import model_config, resolve_source
from jaxlm.cli import main as jaxlm_main
from reference_internlm2 import load_reference

CONFIG_MODULE = "internlm.core.context.parallel_context"


# ----------------------------------------------------- InternEvo-style fixtures
def save_internevo_config(path, values):
    """Pickles ``values`` as an instance of InternEvo's Config (a dict subclass) in a module
    that exists only while pickling, as a file saved by InternEvo would be read without it."""
    names = ["internlm", "internlm.core", "internlm.core.context", CONFIG_MODULE]
    assert not any(n in sys.modules for n in names)
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    config_cls = type("Config", (dict,), {"__module__": CONFIG_MODULE})
    sys.modules[CONFIG_MODULE].Config = config_cls
    try:
        torch.save(config_cls(values), path)
    finally:
        for n in names:
            del sys.modules[n]


def hf_arrays(hf_dir):
    reader = HFCheckpoint(str(hf_dir))
    return {name: reader.read(name) for name in reader.names()}


def hf_state(hf_dir):
    return {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in hf_arrays(hf_dir).items()}


def to_interleaved(wqkv, cfg):
    """HF's half-rotation rows -> InternEvo's pairwise (qk_interleaved) rows, per q and k head."""
    kv, g = cfg["num_key_value_heads"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    x = wqkv.reshape(kv, g + 2, d, -1).clone()
    first, second = x[:, :g + 1, : d // 2], x[:, :g + 1, d // 2:]
    x[:, :g + 1] = torch.stack([first, second], dim=3).reshape(kv, g + 1, d, -1)
    return x.reshape(wqkv.shape)


def write_internevo(hf_dir, dst, *, ranks, stages, mode="tp", split_qkv=False, interleaved=False,
                    embed_split_hidden=True, embed_key="tok_embeddings.weight", prefix="model.",
                    config_extra=None):
    cfg = json.loads(open(os.path.join(hf_dir, "config.json")).read())
    state = hf_state(hf_dir)
    n_layers = cfg["num_hidden_layers"]
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    q_rows, kv_rows = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    # InternEvo's partition_uniform: `left` stages get L // P, the rest one more
    left = stages - n_layers % stages
    sizes = [n_layers // stages + (p >= left) for p in range(stages)]
    starts = np.cumsum([0] + sizes)
    row = 1 if mode == "tp" else 0
    os.makedirs(dst)
    for p in range(stages):
        shards = [{} for _ in range(ranks)]
        for local, layer in enumerate(range(starts[p], starts[p + 1])):
            hf = lambda s: state[f"model.layers.{layer}.{s}"]
            wqkv = to_interleaved(hf("attention.wqkv.weight"), cfg) if interleaved else hf("attention.wqkv.weight")
            parts = {"attention.wqkv.weight": wqkv.chunk(ranks, 0),
                     "attention.wo.weight": hf("attention.wo.weight").chunk(ranks, row),
                     "feed_forward.w1.weight": hf("feed_forward.w1.weight").chunk(ranks, 0),
                     "feed_forward.w3.weight": hf("feed_forward.w3.weight").chunk(ranks, 0),
                     "feed_forward.w2.weight": hf("feed_forward.w2.weight").chunk(ranks, row)}
            for t, shard in enumerate(shards):
                pre = f"{prefix}layers.{local}."
                for name, pieces in parts.items():
                    if name == "attention.wqkv.weight" and split_qkv:
                        wq, wk, wv = pieces[t].split([q_rows // ranks, kv_rows // ranks, kv_rows // ranks])
                        shard.update({pre + "attention.wq.weight": wq.clone(), pre + "attention.wk.weight": wk.clone(),
                                      pre + "attention.wv.weight": wv.clone()})
                    else:
                        shard[pre + name] = pieces[t].clone()
                for norm in ("attention_norm.weight", "ffn_norm.weight"):
                    shard[pre + norm] = hf(norm).clone()
                shard[pre + "attention.rotary_emb.inv_freq"] = torch.ones(d // 2)
        if p == 0:
            for t, piece in enumerate(state["model.tok_embeddings.weight"].chunk(ranks, 1 if embed_split_hidden else 0)):
                shards[t][prefix + embed_key] = piece.clone()
        if p == stages - 1:
            for t, piece in enumerate(state["output.weight"].chunk(ranks, 0)):
                shards[t][prefix + "norm.weight"] = state["model.norm.weight"].clone()
                shards[t][prefix + "output.weight"] = piece.clone()
        for t, shard in enumerate(shards):
            torch.save(shard, os.path.join(dst, f"model_{mode}{t}_pp{p}.pt"))
            with open(os.path.join(dst, f"topo_{mode}{t}_pp{p}.json"), "w") as f:
                json.dump({"pp_rank": p}, f)
    torch.save({"step": 10}, os.path.join(dst, "context.pt"))
    torch.save({"state": {}}, os.path.join(dst, f"optimizer_{mode}0_pp0_zo0.pt"))
    (open(os.path.join(dst, "sampler.pt"), "wb")).write(b"\x00not a pickle")
    values = dict(num_layers=n_layers, hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"],
                  num_attention_heads=cfg["num_attention_heads"], num_kv_attention_heads=cfg["num_key_value_heads"],
                  mlp_ratio=cfg["intermediate_size"] / cfg["hidden_size"], embed_split_hidden=embed_split_hidden,
                  rope_base=int(cfg["rope_theta"]), layer_norm_epsilon=cfg["rms_norm_eps"], no_bias=True,
                  norm_type="rmsnorm", dtype=torch.float32, max_position_embeddings=cfg["max_position_embeddings"],
                  parallel=dict(tensor=dict(size=ranks, mode="isp" if mode == "wp" else "mtp")))
    values.update(config_extra or {})
    save_internevo_config(os.path.join(dst, "model_config.pt"), values)
    return dst


def listing(path):
    return {name: os.path.getmtime(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def run_cli(module, *args):
    """The converter's main() in this process (a subprocess costs seconds of imports each);
    `test_a_real_process_prints_one_line` runs one as its own process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = importlib.import_module(f"checkpoints_convert.{module}").main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_process(module, *args):
    return subprocess.run([sys.executable, "-m", f"checkpoints_convert.{module}", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def assert_one_line_error(result, *expected):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


# ------------------------------------------------------------------ the layouts
def reference_logits(hf_dir, ids):
    with torch.no_grad():
        return load_reference(str(hf_dir))(torch.tensor(ids)).numpy()


CASES = {
    # name: (HF source, how InternEvo saved it)
    "tp2_pp2_fused": ("tiny_gqa", dict(ranks=2, stages=2, config_extra=dict(adapt_hf=True))),
    "wp2_split_qkv_interleaved": ("tiny_dynamic_ntk", dict(
        ranks=2, stages=1, mode="wp", split_qkv=True, interleaved=True, prefix="",
        config_extra=dict(qk_interleaved=True, adapt_hf=False, use_dynamic_ntk_rope=True, rope_scaling_factor=2.0))),
    "tp2_pp3_vocab_split_old_key": ("synthetic_4_layers", dict(
        ranks=2, stages=3, embed_split_hidden=False, embed_key="tok_embeddings.word_embeddings.weight",
        prefix="", config_extra=dict(adapt_hf=True))),
}


@pytest.fixture(scope="module")
def sources(golden, make_hf_checkpoint):
    def get(name):
        if name == "synthetic_4_layers":  # the golden cases have 2 layers; 3 stages need 3 or more
            return make_hf_checkpoint(num_hidden_layers=4, vocab_size=250, seed=3)
        return str(golden(name))
    return get


@pytest.fixture(scope="module")
def origin(sources, tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            source, options = CASES[case]
            cache[case] = write_internevo(sources(source), str(tmp_path_factory.mktemp("origin") / case), **options)
        return cache[case]
    return get


def expected_logits(sources, case):
    source, _ = CASES[case]
    hf_dir = sources(source)
    if source == "synthetic_4_layers":  # the independent PyTorch reference is the oracle here
        ids = np.arange(1, 25).reshape(2, 12) % 250
        return ids, np.ones_like(ids), None, reference_logits(hf_dir, ids)
    ref = np.load(os.path.join(hf_dir, "golden.npz"))
    return ref["input_ids"], ref["attention_mask"], ref["position_ids"], ref["logits"]


@pytest.mark.parametrize("case", list(CASES))
def test_origin_imports_match_the_golden_logits(case, origin, sources, tmp_path):
    src = origin(case)
    before = listing(src)
    ids, mask, positions, want = expected_logits(sources, case)
    direct = InternLM2ForCausalLM.from_pretrained(src)
    got = np.asarray(direct(ids, attention_mask=mask, position_ids=positions))
    assert np.abs(got - want).max() < 1e-4

    source, _ = CASES[case]
    extra = ["--config", os.path.join(sources(source), "config.json")] if source != "synthetic_4_layers" else []
    out = tmp_path / "hf"
    result = run_cli("internevo_to_hf", "--src", src, "--dst", out, *extra)
    assert result.returncode == 0, result.stderr
    converted = np.asarray(InternLM2ForCausalLM.from_pretrained(str(out))(ids, attention_mask=mask,
                                                                          position_ids=positions))
    assert np.abs(converted - want).max() < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    hf_cfg = json.loads(open(os.path.join(sources(source), "config.json")).read())
    for key in ("num_hidden_layers", "intermediate_size", "num_key_value_heads", "rope_theta", "rope_scaling",
                "max_position_embeddings", "vocab_size"):
        assert cfg[key] == hf_cfg[key], key
    assert listing(src) == before  # the source directory is only read


def test_hf_config_instead_of_model_config(origin, sources, tmp_path):
    """Without model_config.pt, --config supplies the shapes; the rotary order, unstated, is
    taken as interleaved (as InternEvo's converter does) and the shapes decide the embedding split."""
    src = shutil.copytree(origin("wp2_split_qkv_interleaved"), tmp_path / "src")
    os.remove(src / "model_config.pt")
    config = os.path.join(sources("tiny_dynamic_ntk"), "config.json")
    result = run_cli("internevo_to_hf", "--src", src, "--dst", tmp_path / "hf", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "taken as interleaved" in result.stdout
    ids, mask, positions, want = expected_logits(sources, "wp2_split_qkv_interleaved")
    got = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "hf"))(ids, attention_mask=mask, position_ids=positions)
    assert np.abs(np.asarray(got) - want).max() < 1e-4
    wrong = json.loads(open(config).read())
    wrong["intermediate_size"] = 128
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    result = run_cli("internevo_to_hf", "--src", src, "--dst", tmp_path / "out", "--config", tmp_path / "wrong.json")
    assert_one_line_error(result, "wrong.json: intermediate_size is 128, but the Origin checkpoint", "has 352")
    assert not (tmp_path / "out").exists()
    assert_one_line_error(run_cli("internevo_to_hf", "--src", src, "--dst", tmp_path / "out"),
                          "no model_config.pt; pass --config")


def test_origin_source_for_hf_to_jaxlm(origin, sources, tmp_path):
    from jaxlm.checkpoint.convert import hf_to_jaxlm

    hf_to_jaxlm(origin("tp2_pp2_fused"), str(tmp_path / "j"))
    ids, mask, positions, want = expected_logits(sources, "tp2_pp2_fused")
    got = np.asarray(InternLM2ForCausalLM.from_pretrained(str(tmp_path / "j"))(ids, attention_mask=mask,
                                                                                position_ids=positions))
    assert np.abs(got - want).max() < 1e-4


def test_an_origin_dir_is_a_model_source_for_config_info_and_serve(origin, sources, tmp_path, capsys):
    """No config.json there: the config comes from the shards wherever a model is taken."""
    src = origin("tp2_pp2_fused")
    want = InternLM2Config.from_pretrained(sources("tiny_gqa"))
    assert resolve_source(src).kind == "origin"
    got = model_config(src)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(got, key) == getattr(want, key), key
    with pytest.raises(ConfigError, match="an InternEvo Origin checkpoint: its config is derived from the shards"):
        InternLM2Config.from_pretrained(src)   # config.json only; it names the way that reads the shards

    assert jaxlm_main(["info", "--model", src, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["params"], info["layers"], info["intermediate_size"]) == (want.num_params(), 2, 352)
    plans = []
    for model in (src, str(sources("tiny_gqa"))):   # the same shapes: the same plan
        assert jaxlm_main(["plan", "--model", model, "--context", "64", "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0] == plans[1]

    # jaxlm serve resolves the config from the shards, then the tokenizer (none here: the next error)
    no_tokenizer = tmp_path / "no_tokenizer"
    with pytest.raises(SystemExit) as exit_info:
        jaxlm_main(["serve", "--model", src, "--tokenizer", str(no_tokenizer), "--port", "0"])
    assert exit_info.value.code == 1 and capsys.readouterr().err.strip().splitlines() == [
        f"error: {no_tokenizer}: no tokenizer.model found (the SentencePiece model of InternLM2)"]
    broken = copy_origin(origin, tmp_path)
    os.remove(broken / "model_tp1_pp1.pt")
    with pytest.raises(SystemExit) as exit_info:
        jaxlm_main(["serve", "--model", str(broken), "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "missing shard model_tp1_pp1.pt" in err[0]


def test_sharded_load_reads_slices_of_the_joined_tensors(origin, sources, monkeypatch):
    """On a (data=2, fsdp=2, tensor=2) mesh each device asks the Origin reader for its own
    slices; each tensor is still joined from its shards once."""
    import jax

    from jaxlm.checkpoint.internevo import OriginCheckpoint
    from jaxlm.sharding import make_mesh

    joins, join = [], OriginCheckpoint._join
    monkeypatch.setattr(OriginCheckpoint, "_join", lambda self, name: joins.append(name) or join(self, name))

    if len(jax.devices()) != 8:
        pytest.fail("needs the 8 simulated CPU devices tests/conftest.py asks for")
    ids, mask, positions, want = expected_logits(sources, "wp2_split_qkv_interleaved")
    model = InternLM2ForCausalLM.from_pretrained(origin("wp2_split_qkv_interleaved"),
                                                 mesh=make_mesh(dict(data=2, fsdp=2, tensor=2, context=1)))
    assert model.model.layers[0].attention.wqkv.kernel.get_value().sharding.spec[0] == "tensor"
    assert len(joins) == len(set(joins)) == 3 + 7 * 2  # embedding, final norm, output; 7 per layer
    got = np.asarray(model(ids, attention_mask=mask, position_ids=positions))
    assert np.abs(got - want).max() < 1e-4


def test_config_pt_is_read_without_internevo_and_only_plain_values(origin, tmp_path):
    values = read_origin_config(os.path.join(origin("tp2_pp2_fused"), "model_config.pt"))
    assert type(values) is dict and type(values["parallel"]) is dict and values["dtype"] is torch.float32
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses InternEvo's class
        torch.load(os.path.join(origin("tp2_pp2_fused"), "model_config.pt"), weights_only=True)
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format: magic, protocol, sys info, then the object
    torch.save({"num_layers": 2, "dtype": torch.bfloat16}, legacy, _use_new_zipfile_serialization=False)
    assert read_origin_config(str(legacy)) == {"num_layers": 2, "dtype": torch.bfloat16}
    evil = tmp_path / "model_config.pt"

    class Exploit:  # unpickling this would run a shell command
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"num_layers": 2, "payload": Exploit()}, evil)
    from jaxlm.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
        read_origin_config(str(evil))
    assert not (tmp_path / "pwned").exists()


def test_rotary_flags_and_stage_partition():
    assert is_interleaved({"qk_interleaved": True}) and not is_interleaved({"qk_interleaved": False, "adapt_hf": False})
    assert is_interleaved({"adapt_hf": False}) and not is_interleaved({"adapt_hf": True})
    assert [list(r) for r in stage_layers(3, 2)] == [[0], [1, 2]]
    assert [len(r) for r in stage_layers(32, 3)] == [10, 11, 11]


def test_norm_head_rows_are_normalized(origin, tmp_path):
    from jaxlm.checkpoint.internevo import OriginCheckpoint

    src = copy_origin(origin, tmp_path)
    values = read_origin_config(str(src / "model_config.pt"))
    save_internevo_config(src / "model_config.pt", {**values, "norm_head": True})
    plain = OriginCheckpoint(origin("tp2_pp2_fused")).read("output.weight")
    normed = OriginCheckpoint(str(src)).read("output.weight")
    np.testing.assert_allclose(normed, plain / np.linalg.norm(plain, axis=1, keepdims=True), rtol=1e-5)


# ------------------------------------------------------------------ HF -> Origin
def read_shards(path):
    return {name: torch.load(os.path.join(path, name), weights_only=True)
            for name in sorted(os.listdir(path)) if name.startswith("model_t")}


def test_hf_to_origin_to_hf_is_bit_exact(golden, tmp_path):
    src = golden("tiny_chat_realvocab")  # bfloat16, two safetensors shards
    result = run_cli("hf_to_internevo", "--src", src, "--dst", tmp_path / "o", "--tp", 2, "--pp", 2)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "o")) == sorted(
        [f"model_tp{t}_pp{p}.pt" for t in range(2) for p in range(2)] + ["model_config.pt"])
    shards = read_shards(tmp_path / "o")
    first, last = shards["model_tp1_pp0.pt"], shards["model_tp0_pp1.pt"]
    assert "model.tok_embeddings.weight" in first and "model.norm.weight" not in first
    assert {"model.norm.weight", "model.output.weight", "model.layers.0.attention.wqkv.weight"} <= set(last)
    assert "model.tok_embeddings.weight" not in last and first["model.tok_embeddings.weight"].shape == (92544, 32)
    assert all(t.dtype == torch.bfloat16 for s in shards.values() for t in s.values())
    config = torch.load(tmp_path / "o" / "model_config.pt", weights_only=True)
    assert type(config) is dict and config["qk_interleaved"] is False and config["embed_split_hidden"] is True
    result = run_cli("internevo_to_hf", "--src", tmp_path / "o", "--dst", tmp_path / "h",
                     "--tokenizer", src, "--max-shard-size", "12MB")
    assert result.returncode == 0, result.stderr
    original, back = hf_arrays(src), hf_arrays(tmp_path / "h")
    assert sorted(original) == sorted(back)
    for name in original:
        assert original[name].dtype == back[name].dtype and original[name].tobytes() == back[name].tobytes(), name
    assert (tmp_path / "h" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


def test_bin_source_three_layers_on_two_stages(make_hf_checkpoint, tmp_path):
    from jaxlm.checkpoint.internevo_write import write_origin

    src = make_hf_checkpoint(fmt="bin", num_hidden_layers=3, max_shard_bytes=100_000)
    write_origin(src, str(tmp_path / "o"), tp=1, pp=2)
    shards = read_shards(tmp_path / "o")
    layers = lambda s: sorted({k.split(".")[2] for k in s if k.startswith("model.layers.")})
    assert layers(shards["model_tp0_pp0.pt"]) == ["0"] and layers(shards["model_tp0_pp1.pt"]) == ["0", "1"]
    assert np.array_equal(shards["model_tp0_pp1.pt"]["model.layers.1.feed_forward.w2.weight"].numpy(),
                          hf_arrays(src)["model.layers.2.feed_forward.w2.weight"])


# ------------------------------------------------------------------ bad inputs
def copy_origin(origin, tmp_path):
    return shutil.copytree(origin("tp2_pp2_fused"), tmp_path / "src")


def break_missing_shard(d):
    os.remove(d / "model_tp1_pp0.pt")
    return ["missing shard model_tp1_pp0.pt"]


def break_stage_hole(d):
    for t in range(2):
        os.rename(d / f"model_tp{t}_pp1.pt", d / f"model_tp{t}_pp2.pt")
    return ["missing shard model_tp0_pp1.pt"]


def break_truncated(d):
    data = (d / "model_tp0_pp1.pt").read_bytes()
    (d / "model_tp0_pp1.pt").write_bytes(data[: len(data) // 2])
    return ["model_tp0_pp1.pt"]


def break_corrupt(d):
    (d / "model_tp1_pp1.pt").write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    return ["model_tp1_pp1.pt"]


def break_corrupt_config(d):
    (d / "model_config.pt").write_bytes(b"\x80\x02garbage")
    return ["model_config.pt", "cannot read the InternEvo config"]


def break_shape(d):
    shard = torch.load(d / "model_tp1_pp1.pt", weights_only=True)
    shard["model.layers.0.feed_forward.w2.weight"] = shard["model.layers.0.feed_forward.w2.weight"][:, :-1].clone()
    torch.save(shard, d / "model_tp1_pp1.pt")
    return ["model.layers.0.feed_forward.w2.weight", "(128, 175)", "(128, 176)"]


def break_norm_copies(d):
    shard = torch.load(d / "model_tp1_pp0.pt", weights_only=True)
    shard["model.layers.0.ffn_norm.weight"] = shard["model.layers.0.ffn_norm.weight"] + 1
    torch.save(shard, d / "model_tp1_pp0.pt")
    return ["model_tp1_pp0.pt", "ffn_norm.weight", "differs"]


def break_fsdp_names(d):
    for name in os.listdir(d):
        if name.startswith("model_tp"):
            os.rename(d / name, d / name.replace(".pt", "_dp0.pt"))
    return ["FSDP-sharded InternEvo saves"]


BREAKS = [break_fsdp_names, break_missing_shard, break_stage_hole, break_truncated, break_corrupt, break_corrupt_config,
          break_shape, break_norm_copies]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_bad_origin_input_is_one_clear_line(origin, tmp_path, breaker):
    src = copy_origin(origin, tmp_path)
    expected = breaker(src)
    result = run_cli("internevo_to_hf", "--src", src, "--dst", tmp_path / "out")
    assert_one_line_error(result, *expected)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # nothing at --dst, no temporary left


def test_a_real_process_prints_one_line(origin, tmp_path):
    src = copy_origin(origin, tmp_path)
    os.remove(src / "model_tp1_pp1.pt")
    assert_one_line_error(run_process("internevo_to_hf", "--src", src, "--dst", tmp_path / "out"),
                          "missing shard model_tp1_pp1.pt")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_existing_destinations_and_bad_splits(origin, golden, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("internevo_to_hf", "--src", origin("tp2_pp2_fused"), "--dst", dst), "--overwrite")
    assert_one_line_error(run_cli("hf_to_internevo", "--src", golden("tiny_gqa"), "--dst", dst, "--tp", 2),
                          "--overwrite")
    assert os.listdir(dst) == ["keep.txt"]
    for flags, text in ((["--tp", 3], "--tp 3"), (["--pp", 3], "--pp 3: 2 layers"), (["--tp", 0], "--tp")):
        assert_one_line_error(run_cli("hf_to_internevo", "--src", golden("tiny_gqa"), "--dst", tmp_path / "o",
                                      *flags), text)
    assert_one_line_error(run_cli("internevo_to_hf", "--src", golden("tiny_gqa"), "--dst", tmp_path / "o"),
                          "not an InternEvo checkpoint")
    # argparse's own errors are one line too (the converters' shared command line)
    assert_one_line_error(run_cli("hf_to_internevo", "--src", golden("tiny_gqa")), "required: --dst")
    assert_one_line_error(run_cli("hf_to_internevo", "--src", golden("tiny_gqa"), "--dst", tmp_path / "o",
                                  "--tp", "two"), "argument --tp: invalid int value: 'two'")
    assert_one_line_error(run_cli("internevo_to_hf", "--dst", tmp_path / "o"), "required: --src")
    assert sorted(os.listdir(tmp_path)) == ["out"]

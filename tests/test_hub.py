"""Hub ids as model sources, offline, from a cache laid out as huggingface_hub lays it out
(``models--org--name/{blobs, snapshots/<commit>, refs/<branch or tag>}``)."""

import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest

from jaxlm import InternLM2Config, InternLM2ForCausalLM, InternLM2Tokenizer
from jaxlm.chat import build_prompt
from jaxlm.checkpoint.hub import HubId, parse_hub_id, resolve_model_path
from jaxlm.checkpoint.source import model_config, resolve_source
from jaxlm.cli import main as jaxlm_main
from jaxlm.errors import JaxlmError

REPO_ID = "jaxlm-test/tiny-gqa"
CHAT_ID = "jaxlm-test/tiny-chat"   # the real-vocabulary golden case: tokenizer files, two safetensors shards
MAIN, V1, CHAT_MAIN = "a" * 40, "b" * 40, "c" * 40
CHAT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.model",
              "tokenizer_config.json")


def add_snapshot(cache, repo_id, commit, files, refs):
    """Files as blobs named by their sha256, linked from the commit's snapshot folder, as the hub client does."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return str(snapshot)


@pytest.fixture(scope="module")
def hub_cache(golden, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    src = golden("tiny_gqa")
    files = {name: (src / name).read_bytes() for name in ("config.json", "model.safetensors")}
    main = add_snapshot(cache, REPO_ID, MAIN, files, ["main"])
    older = add_snapshot(cache, REPO_ID, V1, {"config.json": files["config.json"]}, ["v1"])
    chat_src = golden("tiny_chat_realvocab")
    chat = add_snapshot(cache, CHAT_ID, CHAT_MAIN, {name: (chat_src / name).read_bytes() for name in CHAT_FILES},
                        ["main"])
    return types.SimpleNamespace(path=cache, main=main, v1=older, golden=src, chat=chat, chat_golden=chat_src)


@pytest.fixture
def offline(hub_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")   # read by jaxlm at call time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache.path))
    return hub_cache


def test_parsing_ids():
    assert parse_hub_id("internlm/internlm2-chat-7b") == HubId("huggingface", "internlm/internlm2-chat-7b", None)
    assert parse_hub_id("internlm/internlm2_5-7b-chat@v1.0") == HubId("huggingface", "internlm/internlm2_5-7b-chat",
                                                                      "v1.0")
    assert parse_hub_id("modelscope:Shanghai_AI_Laboratory/internlm2-chat-7b") == HubId(
        "modelscope", "Shanghai_AI_Laboratory/internlm2-chat-7b", None)
    for not_an_id in ("/abs/path", "./rel/dir", "a/b/c", "../up/dir", "plainname", "internlm2-1_8b"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    with pytest.raises(JaxlmError, match="not a ModelScope model id"):
        parse_hub_id("modelscope:no-slash")


def test_local_paths_win_and_others_pass_through(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == "org/name"        # an existing directory is never looked up
    assert resolve_model_path("/no/such/dir") == "/no/such/dir"  # not an id: the caller's error names it


def test_from_pretrained_by_hub_id_offline_equals_golden(offline):
    assert resolve_model_path(REPO_ID) == offline.main
    assert resolve_model_path(REPO_ID, revision="v1") == offline.v1
    assert resolve_model_path(f"{REPO_ID}@v1") == offline.v1
    ref = np.load(offline.golden / "golden.npz")
    model = InternLM2ForCausalLM.from_pretrained(REPO_ID)
    got = np.asarray(model(ref["input_ids"], attention_mask=ref["attention_mask"], position_ids=ref["position_ids"]))
    assert np.abs(got - ref["logits"]).max() < 1e-4


def test_uncached_offline_and_missing_clients_are_clear_errors(offline, monkeypatch):
    from jaxlm.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"jaxlm-test/absent: not a local path, and not in the "
                                              r"HuggingFace cache at revision main \(HF_HUB_OFFLINE=1\)"):
        resolve_model_path("jaxlm-test/absent")
    with pytest.raises(CheckpointError, match="revision nope"):
        resolve_model_path(REPO_ID, revision="nope")
    with pytest.raises(JaxlmError, match="disagree"):
        resolve_model_path(f"{REPO_ID}@v1", revision="main")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(JaxlmError, match=r"needs the modelscope package: pip install 'jaxlm\[modelscope\]'"):
        resolve_model_path("modelscope:Shanghai_AI_Laboratory/internlm2-chat-7b")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(JaxlmError, match=r"needs huggingface_hub: pip install 'jaxlm\[hub\]'"):
        resolve_model_path("internlm/internlm2-chat-7b")


def test_tokenizer_and_config_by_hub_id(offline, capsys):
    """Both come from the id's snapshot (its config and tokenizer files only) and equal the local ones."""
    assert resolve_model_path(CHAT_ID, weights=False) == offline.chat
    by_id, local = InternLM2Tokenizer.from_pretrained(CHAT_ID), InternLM2Tokenizer.from_pretrained(
        str(offline.chat_golden))
    text = "<|im_start|>user\n你好, time management<|im_end|>"
    assert by_id.encode(text) == local.encode(text) and by_id.special_tokens == local.special_tokens
    assert by_id.eos_token_id == local.eos_token_id == 2
    assert InternLM2Config.from_pretrained(CHAT_ID) == InternLM2Config.from_pretrained(str(offline.chat_golden))
    tiny = InternLM2Config.from_json_file(str(offline.golden / "config.json"))
    assert InternLM2Config.from_pretrained(REPO_ID, revision="v1") == model_config(f"{REPO_ID}@v1") == tiny
    infos = []
    for model in (CHAT_ID, str(offline.chat_golden)):
        assert jaxlm_main(["info", "--model", model, "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[0] == infos[1] and infos[0]["vocab_size"] == 92544
    source = resolve_source(CHAT_ID)
    assert (source.path, source.kind, source.name) == (offline.chat, "hf", CHAT_ID)
    with pytest.raises(JaxlmError, match=f"{offline.main}: no tokenizer.model found"):
        InternLM2Tokenizer.from_pretrained(REPO_ID)   # that repository ships none


def test_generate_cli_by_hub_id_equals_golden(offline, capsys):
    """``jaxlm generate --model ORG/NAME``: weights and tokenizer from the cached snapshot, the golden
    greedy continuation of the golden chat prompt."""
    case = json.loads((offline.chat_golden / "chat_case.json").read_text())
    ref = np.load(offline.chat_golden / "golden.npz")
    prompt = build_prompt(case["query"], case["history"], case["meta_instruction"])
    code = jaxlm_main(["generate", "--model", CHAT_ID, "--prompt", prompt, "--max-new-tokens", "12", "--json",
                       "--dtype", "float32"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    n = ref["prompt_ids"].shape[1]
    assert out["prompt_tokens"] == n and out["token_ids"] == ref["greedy_ids"][0, n:].tolist()


def test_converter_src_and_serve_model_take_hub_ids(offline, tmp_path, capsys):
    from checkpoints_convert import hf_to_internevo, hf_to_jaxlm

    assert hf_to_jaxlm.main(["--src", REPO_ID, "--dst", str(tmp_path / "j")]) == 0
    assert (tmp_path / "j" / "config.json").read_text() and (tmp_path / "j" / "params").is_dir()
    assert hf_to_internevo.main(["--src", REPO_ID, "--dst", str(tmp_path / "o"), "--tp", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["model_config.pt", "model_tp0_pp0.pt", "model_tp1_pp0.pt"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        jaxlm_main(["serve", "--model", "jaxlm-test/absent", "--port", "0"])
    assert exit_info.value.code == 1 and capsys.readouterr().err.strip().splitlines() == [
        "error: jaxlm-test/absent: not a local path, and not in the HuggingFace cache at revision main "
        "(HF_HUB_OFFLINE=1)"]

"""Fine-tuning: loss falls, exact gradients under accumulation and packing, LoRA and its
exports (PEFT, merged), kill-and-resume, NaN stop, malformed data, config errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, tiny_config
from jaxlm import ConfigError, InternLM2ForCausalLM, JaxlmError
from jaxlm.train.config import DataSection, ModelSection, TrainConfig, load_experiment
from jaxlm.train.data import PackedBatches, encode_chat, load_examples
from jaxlm.train.lora import LoRAConfig, apply_lora, load_adapter
from jaxlm.train.step import OptimizerConfig, loss_and_grads, token_losses
from jaxlm.train.trainer import train

TINY_SFT = str(REPO / "experiments" / "tiny_sft.py")
SMALL = ["--set", "data.seq_len=64", "--set", "global_batch=8", "--set", "eval_every=0"]


def jaxlm(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one device, like a user's laptop
    return subprocess.run([sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900, **kwargs)


def metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_tiny_sft_learns_the_task(tmp_path):
    """The shipped tiny experiment: the loss falls clearly and the model then answers."""
    result = jaxlm("train", "--config", TINY_SFT, "--workdir", str(tmp_path), "--no-progress",
                   "--set", "steps=150", "--set", "log_every=5", "--set", "eval_every=75")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 3.0 and losses[-1] < 0.2 and losses[-1] < losses[0] / 20
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"):
        assert key in rows[-1]
    assert rows[-1]["eval_loss"] < 0.5
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    from jaxlm import InternLM2Tokenizer

    model = InternLM2ForCausalLM.from_pretrained(str(tmp_path / "final"))
    tok = InternLM2Tokenizer.from_pretrained(str(tmp_path / "final"))
    answer, _ = model.chat(tok, "What is the capital of Japan?", meta_instruction="", do_sample=False,
                           max_new_tokens=16)
    assert answer == "The capital of Japan is Tokyo."


@pytest.fixture(scope="module")
def tiny_model(seed):
    return InternLM2ForCausalLM(tiny_config(), rngs=nnx.Rngs(seed))


def test_micro_batches_give_the_same_gradient(tiny_model, rng):
    graphdef, params, rest = nnx.split(tiny_model, nnx.Param, ...)
    ids = rng.integers(3, 256, (8, 33))
    weights = (rng.random((8, 32)) < 0.7).astype(np.float32)  # uneven target counts per row
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": weights}
    loss1, grads1, _ = jax.jit(loss_and_grads, static_argnums=(0, 4))(graphdef, params, rest, batch, 1)
    loss4, grads4, _ = jax.jit(loss_and_grads, static_argnums=(0, 4))(graphdef, params, rest, batch, 4)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads4)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_packed_rows_equal_examples_one_by_one(seed):
    from jaxlm.tokenizer import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_pretrained(str(REPO / "jaxlm/assets/tiny"))
    tiny_model = InternLM2ForCausalLM(tiny_config(vocab_size=512), rngs=nnx.Rngs(seed))
    chats = [[{"role": "user", "content": f"what is {i} plus {i}?"},
              {"role": "assistant", "content": f"It is {2 * i}."}] for i in range(5)]
    examples = [encode_chat(tok, m) for m in chats]
    seq_len = sum(len(ids) - 1 for ids, _ in examples) + 3
    rows = PackedBatches(examples, seq_len=seq_len, batch_size=1, seed=0, pad_id=2, shuffle=False)._rows(0)
    assert rows["input_ids"].shape[0] == 1 and rows["segment_ids"].max() == 5
    packed = np.asarray(token_losses(tiny_model.forward(rows["input_ids"], position_ids=rows["position_ids"],
                                                        segment_ids=rows["segment_ids"]), rows["targets"]))[0]
    for seg, (ids, _) in enumerate(examples, 1):
        alone = np.asarray(token_losses(tiny_model.forward(np.asarray([ids[:-1]])), np.asarray([ids[1:]])))[0]
        np.testing.assert_allclose(packed[rows["segment_ids"][0] == seg], alone, atol=1e-5)


def lora_config(base_path, tmp_path, **changes):
    base = load_experiment(TINY_SFT, ["steps=6", "data.seq_len=64", "global_batch=8", "eval_every=0",
                                      "log_every=2", "checkpoint_every=3"])
    return dataclasses.replace(
        base, model=dataclasses.replace(base.model, name=base_path, tokenizer=str(REPO / "jaxlm/assets/tiny")),
        lora=LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.1, targets=("wqkv", "wo", "w1", "w2", "w3")),
        optimizer=dataclasses.replace(base.optimizer, learning_rate=5e-2), **changes)


def test_lora_trains_only_adapters_and_exports(make_hf_checkpoint, tmp_path, rng):
    import torch
    from peft import LoraConfig as PeftConfig
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from reference_internlm2 import load_reference

    base = make_hf_checkpoint(vocab_size=512)
    result = train(lora_config(base, tmp_path), str(tmp_path / "run"), progress=False, log=lambda m: None)
    base_model = InternLM2ForCausalLM.from_pretrained(base)
    # the base weights are untouched: the trained run's frozen params equal the checkpoint's
    ids = rng.integers(3, 512, (2, 20))
    adapted = InternLM2ForCausalLM.from_pretrained(base)
    cfg = load_adapter(adapted, str(tmp_path / "run" / "adapter"))
    assert cfg.rank == 4
    base_logits, adapted_logits = np.asarray(base_model(ids)), np.asarray(adapted(ids))
    assert np.abs(adapted_logits - base_logits).max() > 1e-3  # the adapter learned something
    # merged export (final/) equals base + adapter
    merged = np.asarray(InternLM2ForCausalLM.from_pretrained(result["final"])(ids))
    np.testing.assert_allclose(merged, adapted_logits, atol=1e-4)
    # merge_lora on the HF base gives the same model
    out = subprocess.run([sys.executable, "-m", "checkpoints_convert.merge_lora", "--base", base, "--adapter",
                          str(tmp_path / "run" / "adapter"), "--dst", str(tmp_path / "merged")],
                         capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.asarray(InternLM2ForCausalLM.from_pretrained(str(tmp_path / "merged"))(ids)),
                               adapted_logits, atol=1e-4)
    # PEFT loads the adapter onto the original PyTorch model and agrees
    ref = load_reference(base)
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        peft_cfg = json.load(f)
    inject_adapter_in_model(PeftConfig(r=peft_cfg["r"], lora_alpha=peft_cfg["lora_alpha"],
                                       target_modules=peft_cfg["target_modules"]), ref)
    state = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    missing = set_peft_model_state_dict(ref, {k.removeprefix("base_model.model."): v for k, v in state.items()})
    assert not missing.unexpected_keys
    with torch.no_grad():
        torch_logits = ref(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(torch_logits, adapted_logits, atol=1e-4)


def test_lora_base_weights_stay_bit_identical(make_hf_checkpoint, tmp_path, seed, rng):
    from jaxlm.train.step import make_optimizer, train_step

    model = InternLM2ForCausalLM.from_pretrained(make_hf_checkpoint(vocab_size=512), scan_layers=True)
    apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.1), seed=seed)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(frozen)]
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=5))
    state = opt.init(trainable)
    ids = rng.integers(3, 512, (4, 17))
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_weights": np.ones((4, 16), np.float32)}
    first = jax.tree.leaves(trainable)[0].copy()
    for step in range(3):
        trainable, state, _ = train_step(graphdef, trainable, frozen, state, batch, optimizer=opt,
                                         dropout_key=jax.random.fold_in(jax.random.key(seed), step))
    assert not np.array_equal(jax.tree.leaves(trainable)[0], first)
    for a, b in zip(before, jax.tree.leaves(frozen)):
        assert np.array_equal(a, np.asarray(b))


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    args = ["train", "--config", TINY_SFT, "--no-progress", *SMALL, "--set", "steps=24",
            "--set", "checkpoint_every=6", "--set", "log_every=1", "--set", "lora.enabled=true",
            "--set", "lora.dropout=0.1"]
    straight = jaxlm(*args, "--workdir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    work = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jaxlm", *args, "--workdir", str(work)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (work / "metrics.jsonl").exists() and any(r["step"] >= 15 for r in metrics(work)):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in metrics(work)) < 24  # really killed mid-way
    resumed = jaxlm(*args, "--workdir", str(work))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    a = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight")}
    b = {r["step"]: r["loss"] for r in metrics(work)}
    assert sorted(b) == list(range(1, 25))
    for step in range(1, 25):
        assert abs(a[step] - b[step]) <= 1e-4, step


def test_nan_loss_stops_cleanly(tmp_path):
    result = jaxlm("train", "--config", TINY_SFT, "--workdir", str(tmp_path), "--no-progress", *SMALL,
                   "--set", "steps=30", "--set", "checkpoint_every=2", "--set", "log_every=1",
                   "--set", "optimizer.learning_rate=1e12",
                   "--set", "optimizer.clip_norm=0", "--set", "optimizer.warmup_steps=1")
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: loss is") and "last good checkpoint is step" in line
    assert "Traceback" not in result.stderr
    kept = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert kept and all(np.isfinite(r["loss"]) for r in metrics(tmp_path) if r["step"] <= max(kept))


def test_losses_reach_the_host_only_at_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """The loop does not wait on each step; a NaN between log steps is caught at the next
    sync point, named by the step where it occurred, and never logged or checkpointed."""
    from jaxlm.train import trainer

    fetched, steps = [], []
    original_fetch, original_step = trainer._StepLog.fetch, trainer.train_step

    def fetch(self, manager):
        fetched.append([step for step, _ in self.pending])
        return original_fetch(self, manager)

    def poisoned_step(*args, **kwargs):
        trainable, opt_state, out = original_step(*args, **kwargs)
        steps.append(len(steps) + 1)
        if steps[-1] == 11:
            out = {**out, "loss": out["loss"] * jnp.nan}
        return trainable, opt_state, out

    monkeypatch.setattr(trainer._StepLog, "fetch", fetch)
    monkeypatch.setattr(trainer, "train_step", poisoned_step)
    cfg = load_experiment(TINY_SFT, ["steps=12", "log_every=4", "checkpoint_every=6", "data.seq_len=64",
                                     "global_batch=8", "eval_every=0"])
    with pytest.raises(trainer.TrainingDiverged, match="loss is nan at step 11: .* last good checkpoint is step 6"):
        train(cfg, str(tmp_path), progress=False, log=lambda m: None)
    assert fetched == [[1, 2, 3, 4], [5, 6], [7, 8], [9, 10, 11, 12]]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8] and all(np.isfinite(r["loss"]) for r in rows)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [6]


def test_malformed_lines_are_skipped_or_fatal(tmp_path):
    from jaxlm.tokenizer import InternLM2Tokenizer

    tok = InternLM2Tokenizer.from_pretrained(str(REPO / "jaxlm/assets/tiny"))
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"messages": []}),
                               json.dumps({"messages": [{"role": "robot", "content": "x"}]}), json.dumps(good)]))
    examples = load_examples(str(data), tok, kind="chat", max_tokens=64)
    assert len(examples) == 2
    with pytest.raises(JaxlmError, match=r"data.jsonl:2: "):
        load_examples(str(data), tok, kind="chat", max_tokens=64, strict=True)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 500}))
    from jaxlm.train.data import DataReport

    report = DataReport()
    load_examples(str(long), tok, kind="text", max_tokens=50, report=report)
    assert report.truncated == 1
    result = jaxlm("train", "--config", TINY_SFT, "--workdir", str(tmp_path / "w"), "--strict",
                   "--set", f"data.train_files={data}")
    assert result.returncode == 1 and "data.jsonl:2" in result.stderr and "Traceback" not in result.stderr


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="did you mean steps"):
        load_experiment(TINY_SFT, ["stpes=4"])
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        load_experiment(TINY_SFT, ["optimizer.learning_rat=1"])
    with pytest.raises(ConfigError, match="cannot read 'many' as int"):
        load_experiment(TINY_SFT, ["steps=many"])
    with pytest.raises(ConfigError, match="micro_batches"):
        load_experiment(TINY_SFT, ["micro_batches=3"])
    cfg = load_experiment(TINY_SFT, ["steps=40", "checkpoint_every=10", "log_every=1", "lora.targets=wqkv,w2"])
    assert (cfg.steps, cfg.checkpoint_every, cfg.log_every, cfg.lora.targets) == (40, 10, 1, ("wqkv", "w2"))
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelSection) and isinstance(cfg.data, DataSection)

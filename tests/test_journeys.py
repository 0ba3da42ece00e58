"""The user journeys, executed: both notebooks (nbclient), every example script, and the
TPU VM scripts' dry run, all on the bundled tiny default."""

import os
import subprocess
import sys

import pytest

from conftest import REPO


def user_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAXLM_OFFLINE="1", **extra)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop or a Colab CPU
    return env


def run_notebook(name):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(REPO / "notebooks" / name), as_version=4)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(user_env())  # the kernel inherits this environment
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            elif "data" in out:
                text.append(out["data"].get("text/plain", ""))
                images += "image/png" in out["data"]
    return "".join(text), images


def test_quickstart_notebook():
    text, images = run_notebook("quickstart.ipynb")
    for line in ("backend cpu", "Using the bundled tiny default model", "converted:", "LoRA adapters",
                 "adapter: ['adapter_config.json', 'adapter_model.safetensors']",
                 "merged HF checkpoint:", "same answer after export and reload: True"):
        assert line in text, line
    first, last = (float(x) for x in text.split("loss ")[-1].split("\n")[0].split(" -> "))
    assert last < first / 10
    assert images >= 1  # the loss curve


def test_long_context_notebook():
    text, images = run_notebook("long_context.ipynb")
    assert "one H200, int8 cache, chunk 8192" in text and "fits" in text
    diff = float(text.split("max |chunked - unchunked| over 3000 tokens: ")[1].split()[0])
    assert diff < 1e-4
    assert "score " in text and "over 15 prompts" in text
    assert images >= 1  # the heatmap, inline


@pytest.mark.parametrize("script, args, expected", [
    ("convert_and_chat.py", [], ["converted to", "chat done: 2 turns"]),
    ("finetune_lora.py", ["--steps", "120"], ["LoRA loss", "adapter (PEFT layout)", "merged model, reloaded"]),
    ("long_context_needle.py", [], ["plan for 2000 tokens", "chunked vs unchunked logits", "heatmap:"]),
    ("multihost_launch.py", [], ["process 0 of 1", "trained to loss"]),
])
def test_example_scripts(script, args, expected):
    result = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True,
                            text=True, env=user_env(), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for line in expected:
        assert line in result.stdout, line


def test_tpu_vm_scripts_dry_run():
    scripts = REPO / "scripts" / "tpu_vm"
    env = user_env(TPU_NAME="ci-slice", ZONE="us-central2-b", PROJECT="ci-project")
    run = lambda *a: subprocess.run(["bash", *a], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    create = run(str(scripts / "create.sh"), "--dry-run")
    assert create.returncode == 0 and "would run: gcloud compute tpus tpu-vm create ci-slice" in create.stdout
    for step in ("setup.sh", "fetch_checkpoint.sh"):
        out = run(str(scripts / step), "--dry-run")
        assert out.returncode == 0 and "--worker=all" in out.stdout, step
    train = run(str(scripts / "launch.sh"), "train", "--dry-run", "--config", "experiments/tiny_sft.py",
                "--workdir", "gs://bucket/run")
    assert train.returncode == 0, train.stderr
    assert "would run: gcloud compute tpus tpu-vm ssh ci-slice" in train.stdout and "--worker=all" in train.stdout
    assert "examples/multihost_launch.py" in train.stdout and "experiments/tiny_sft.py" in train.stdout
    lc = run(str(scripts / "launch.sh"), "long-context", "--dry-run", "--tokens", "200000")
    assert lc.returncode == 0 and "--prompt-tokens 200000" in lc.stdout.replace("\\ ", " ")
    bad = run(str(scripts / "launch.sh"), "explode", "--dry-run")
    assert bad.returncode == 2 and "usage" in bad.stderr

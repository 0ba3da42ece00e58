"""Writes notebooks/quickstart.ipynb and notebooks/long_context.ipynb (without outputs).

    python scripts/make_notebooks.py

The notebooks are generated so their code stays reviewable as plain Python here;
CI executes the generated files with nbclient (tests/test_journeys.py).
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = "https://colab.research.google.com/github/jaxlm/jaxlm/blob/main/notebooks/{}"

INSTALL = '''\
# Install jaxlm (skipped when it is already installed, e.g. in the repository's own environment).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jaxlm") is None:
    source = os.environ.get("JAXLM_SOURCE", "git+https://github.com/jaxlm/jaxlm.git")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"jaxlm[eval] @ {source}"
                           if source.startswith("git+") else f"{source}[eval]"])
import jax, jaxlm
print(f"jaxlm {jaxlm.__version__}, jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.device_count()}")'''

CHOOSE_MODEL = '''\
# Pick the model for this machine: a real InternLM2 on an accelerator with internet access,
# the bundled tiny InternLM2 otherwise (CPU, or offline).
import socket, tempfile

def online(host="huggingface.co", timeout=2.0):
    if os.environ.get("JAXLM_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False

work = tempfile.mkdtemp(prefix="jaxlm-quickstart-")
accelerator = jax.default_backend() in ("tpu", "gpu")
if accelerator and online():
    from huggingface_hub import HfApi, snapshot_download
    REPO_ID = "internlm/internlm2-chat-1_8b"
    # one copy of the weights: safetensors when the repo has them, else the .bin files (needs torch)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in HfApi().list_repo_files(REPO_ID)) else "*.bin"
    hf_dir = snapshot_download(REPO_ID, local_dir=os.path.join(work, "hf"),
                               allow_patterns=["*.json", "tokenizer.model", weights])
    TINY = False
    print(f"{jax.default_backend().upper()} and internet: using internlm2-chat-1_8b from the Hugging Face hub")
else:
    from jaxlm.assets import TINY_DIR
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint
    from jaxlm.config import InternLM2Config
    from jaxlm.files import copy_if_present
    hf_dir = os.path.join(work, "hf")
    write_hf_checkpoint(hf_dir, InternLM2Config.from_pretrained(TINY_DIR), seed=0)
    copy_if_present(TINY_DIR, hf_dir, ["tokenizer.model", "tokenizer_config.json"])
    TINY = True
    print("Using the bundled tiny default model (no accelerator or no internet): 0.84M parameters with "
          "random weights, so its first answers are noise; fine-tuning below teaches it a small task.")
print("HF checkpoint:", hf_dir, sorted(os.listdir(hf_dir)))'''

CONVERT = '''\
# Convert the HF checkpoint into a jaxlm (Orbax) checkpoint: streaming, bit-exact.
from jaxlm.checkpoint.convert import hf_to_jaxlm
info = hf_to_jaxlm(hf_dir, os.path.join(work, "jaxlm"), overwrite=True)
print(f"converted: {info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights; copied {info['copied']}")'''

CHAT = '''\
# Chat, streaming the answer as it is generated (the API of HF's model.chat / stream_chat).
from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
model = InternLM2ForCausalLM.from_pretrained(os.path.join(work, "jaxlm"), dtype=None if TINY else "bfloat16")
tokenizer = InternLM2Tokenizer.from_pretrained(os.path.join(work, "jaxlm"))
QUESTION = "What is the capital of Japan?"
SYSTEM = "" if TINY else None  # the tiny model was never shown a system prompt

def ask(model, question=QUESTION):
    kwargs = {} if SYSTEM is None else {"meta_instruction": SYSTEM}
    shown = ""
    for response, _ in model.stream_chat(tokenizer, question, [], do_sample=False, max_new_tokens=24, **kwargs):
        print(response[len(shown):], end="", flush=True)
        shown = response
    print()
    return shown

print("user:", QUESTION)
print("assistant: ", end="")
before = ask(model)'''

FINETUNE = '''\
# LoRA fine-tuning for a few steps on a small bundled chat dataset (capitals of 40 countries).
from jaxlm.assets import TINY_DIR
from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig
from jaxlm.train.trainer import train

config = TrainConfig(
    model=ModelSection(name=os.path.join(work, "jaxlm"), dtype="float32" if TINY else "bfloat16",
                       param_dtype="float32" if TINY else "bfloat16", scan_layers=True,
                       remat="none" if TINY else "full"),
    data=DataSection(train_files=(os.path.join(TINY_DIR, "train.jsonl"),), seq_len=128),
    optimizer=OptimizerConfig(learning_rate=1e-2 if TINY else 2e-4, warmup_steps=10),
    lora=LoRAConfig(enabled=True, rank=16, alpha=32, dropout=0.0),
    mesh="fsdp=-1", steps=200 if TINY else 60, global_batch=16 if TINY else 8,
    checkpoint_every=100, log_every=5, eval_every=0).validate()
result = train(config, os.path.join(work, "run"), progress=False)
print(f"loss {result['losses'][0][1]:.3f} -> {result['losses'][-1][1]:.3f}")'''

PLOT = '''\
# The loss curve, from the run's metrics.jsonl.
import json
import matplotlib.pyplot as plt
rows = [json.loads(line) for line in open(os.path.join(work, "run", "metrics.jsonl"))]
plt.figure(figsize=(6, 3))
plt.plot([r["step"] for r in rows], [r["loss"] for r in rows])
plt.xlabel("step"); plt.ylabel("loss"); plt.yscale("log"); plt.title("LoRA fine-tuning")
plt.tight_layout(); plt.show()'''

EXPORT = '''\
# Export: the adapter in PEFT's layout, and the merged model as HF safetensors.
from jaxlm.checkpoint.convert import write_hf
from jaxlm.train.lora import merged_tensor, read_adapter
adapter = os.path.join(work, "run", "adapter")
_, deltas = read_adapter(adapter)
merged_hf = os.path.join(work, "merged_hf")
write_hf(hf_dir, merged_hf, overwrite=True, transform=lambda name, w: merged_tensor(name, w, deltas))
print("adapter:", sorted(os.listdir(adapter)))
print("merged HF checkpoint:", sorted(os.listdir(merged_hf)))'''

RELOAD = '''\
# Load the exports back and ask again: the trained model and its exports give the same answer.
trained = InternLM2ForCausalLM.from_pretrained(result["final"])
reloaded = InternLM2ForCausalLM.from_pretrained(merged_hf)
print("user:", QUESTION)
print("trained   : ", end=""); after = ask(trained)
print("reloaded  : ", end=""); again = ask(reloaded)
print("same answer after export and reload:", after == again)
if TINY:  # float32: exact; a bfloat16 model may, rarely, round one merged weight differently
    assert after == again'''

LC_MODEL = '''\
# The bundled tiny default (CPU). On a TPU/GPU, set MODEL to a real InternLM2 checkpoint directory.
import tempfile
from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
from jaxlm.assets import TINY_DIR
from jaxlm.checkpoint.synthetic import write_hf_checkpoint
from jaxlm.config import InternLM2Config
from jaxlm.files import copy_if_present
MODEL = os.environ.get("JAXLM_MODEL")
if MODEL is None:
    MODEL = os.path.join(tempfile.mkdtemp(prefix="jaxlm-lc-"), "tiny")
    write_hf_checkpoint(MODEL, InternLM2Config.from_pretrained(TINY_DIR), seed=0)
    copy_if_present(TINY_DIR, MODEL, ["tokenizer.model", "tokenizer_config.json"])
    print("Using the bundled tiny default (random weights: the needle will not be found; the pipeline is the point).")
model = InternLM2ForCausalLM.from_pretrained(MODEL, max_context=8192)
tokenizer = InternLM2Tokenizer.from_pretrained(MODEL)'''

LC_PLAN = '''\
# Will a 200K-token prompt fit? The planner, per device, before anything runs.
from jaxlm.plan import plan_memory, fmt_bytes
from jaxlm.config import InternLM2Config
chat7b = InternLM2Config.from_pretrained("internlm2-chat-7b")
print(f"{'setup':<46} {'per device':>12} {'KV cache':>10}  verdict")
for label, kwargs in [
    ("one H200, bf16 cache, chunk 8192", dict(device="h200", chunk=8192)),
    ("one H200, int8 cache, chunk 8192", dict(device="h200", chunk=8192, kv_cache_dtype="int8")),
    ("v5e-8 (fsdp=2, context=4), chunk 4096", dict(device="v5e", mesh="fsdp=2,context=4", chunk=4096,
                                                    scan_layers=True)),
    ("v5e-8, no chunking", dict(device="v5e", mesh="fsdp=2,context=4", scan_layers=True)),
]:
    p = plan_memory(chat7b, context=200_000, dtype="bfloat16", **kwargs)
    print(f"{label:<46} {fmt_bytes(p.total):>12} {fmt_bytes(p.kv_cache):>10}  {'fits' if p.fits else 'does not fit'}")'''

LC_CHUNKED = '''\
# Chunked prefill gives the unchunked logits, with memory growing as chunk x context.
import numpy as np
ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 3000))
full = np.asarray(model(ids))
chunked = np.asarray(model(ids, chunk_size=512))
print(f"max |chunked - unchunked| over 3000 tokens: {np.abs(full - chunked).max():.2e}")
out = model.generate(ids, max_new_tokens=8, prefill_chunk_size=512, kv_cache_dtype="int8")
print("generated with a 512-token chunked prefill and an int8 KV cache:", out[0, -8:].tolist())'''

LC_NEEDLE = '''\
# Needle in a haystack: prompts built to the requested token length, the needle at each depth.
from IPython.display import Image, display
from jaxlm.eval.needle import heatmap, run
results = run(model, tokenizer, lengths=[1000, 2000, 4000], depths=[0, 25, 50, 75, 100], chunk=512)
png = heatmap(results, os.path.join(tempfile.mkdtemp(), "needle.png"), "needle in a haystack")
print(f"score {np.mean([r['score'] for r in results]):.0%} over {len(results)} prompts")
display(Image(png))'''


def notebook(title: str, name: str, intro: str, cells: list[str]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB.format(name)})"
    nb.cells = [new_markdown_cell(f"# {title}\n\n{badge}\n\n{intro}")]
    for cell in cells:
        if cell.startswith("## "):
            nb.cells.append(new_markdown_cell(cell))
        else:
            nb.cells.append(new_code_cell(cell))
    return nb


def main():
    quick = notebook(
        "jaxlm quickstart: convert, chat, fine-tune, export", "quickstart.ipynb",
        "From an InternLM2 checkpoint to a LoRA fine-tuned, exported model. On a Colab TPU/GPU it uses "
        "`internlm2-chat-1_8b`; on CPU (or offline) the bundled tiny model, in under 5 minutes.",
        ["## 1. Install", INSTALL, "## 2. Choose the model", CHOOSE_MODEL, "## 3. Convert", CONVERT,
         "## 4. Chat (streaming)", CHAT, "## 5. LoRA fine-tuning", FINETUNE, "## 6. Loss curve", PLOT,
         "## 7. Export the adapter and the merged model", EXPORT, "## 8. Load the export back", RELOAD])
    long = notebook(
        "jaxlm long context: plan, chunked prefill, needle heatmap", "long_context.ipynb",
        "The memory planner for 200K tokens, chunked prefill, and a needle-in-a-haystack heatmap. "
        "On CPU it runs on the bundled tiny default.",
        ["## 1. Install", INSTALL, "## 2. Model", LC_MODEL, "## 3. The memory planner", LC_PLAN,
         "## 4. Chunked prefill", LC_CHUNKED, "## 5. Needle in a haystack", LC_NEEDLE])
    os.makedirs(os.path.join(ROOT, "notebooks"), exist_ok=True)
    for nb, name in ((quick, "quickstart.ipynb"), (long, "long_context.ipynb")):
        nbformat.write(nb, os.path.join(ROOT, "notebooks", name))
        print("wrote", os.path.join("notebooks", name))


if __name__ == "__main__":
    main()

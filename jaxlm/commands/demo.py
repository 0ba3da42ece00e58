"""``jaxlm demo``: the main job on the bundled tiny default model.

Fine-tunes the tiny InternLM2 on the bundled capitals task
(experiments/tiny_sft.py's config), chats with the result, and exports it to
an HF directory and back bit-exactly. About a minute on two CPU cores.
"""

import os
import tempfile
import time

import jax
import numpy as np

from jaxlm.assets import TINY_DIR
from jaxlm.checkpoint.convert import hf_to_jaxlm, jaxlm_to_hf
from jaxlm.checkpoint.hf_reader import HFCheckpoint
from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.tokenizer import InternLM2Tokenizer
from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.step import OptimizerConfig
from jaxlm.train.trainer import train


def build_parser(parser):
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        workdir = args.workdir or tempfile.mkdtemp(prefix="jaxlm-demo-")
        return _demo(workdir, args.steps, not args.no_progress)


def tiny_sft_config(steps: int):
    return TrainConfig(
        model=ModelSection(name="tiny", scan_layers=True, attention_impl="xla"),
        data=DataSection(train_files=(os.path.join(TINY_DIR, "train.jsonl"),),
                         eval_files=(os.path.join(TINY_DIR, "eval.jsonl"),), seq_len=128),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, min_lr_ratio=0.05, weight_decay=0.01,
                                  b2=0.98),
        # every local device takes part (fsdp); the batch rounds up to a multiple of them
        steps=steps, global_batch=-(-16 // jax.device_count()) * jax.device_count(),
        checkpoint_every=max(steps // 2, 1), keep_checkpoints=1, log_every=20, eval_every=steps,
        mesh="fsdp=-1").validate()


def _demo(workdir: str, steps: int, progress: bool) -> int:
    t0 = time.perf_counter()
    print(f"[1/3] fine-tuning the bundled tiny InternLM2 on the capitals task ({steps} steps) in {workdir}")
    result = train(tiny_sft_config(steps), os.path.join(workdir, "train"), progress=progress, log=print)
    losses = [loss for _, loss in result["losses"]]
    print(f"      loss {losses[0]:.3f} -> {losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")

    final = result["final"]
    model = InternLM2ForCausalLM.from_pretrained(final)
    tokenizer = InternLM2Tokenizer.from_pretrained(final)
    print(f"[2/3] chatting with {final}")
    correct = 0
    for country, capital in (("Japan", "Tokyo"), ("Peru", "Lima"), ("Norway", "Oslo")):
        question = f"Tell me the capital of {country}."  # a phrasing never trained on
        answer, _ = model.chat(tokenizer, question, meta_instruction="", do_sample=False, max_new_tokens=24)
        correct += capital in answer
        print(f"      user: {question}\n      assistant: {answer}")

    hf_dir, back = os.path.join(workdir, "hf"), os.path.join(workdir, "jaxlm_again")
    jaxlm_to_hf(final, hf_dir, overwrite=True)
    hf_to_jaxlm(hf_dir, back, overwrite=True)
    ids = np.arange(3, 35)[None]
    same = np.array_equal(np.asarray(model(ids)), np.asarray(InternLM2ForCausalLM.from_pretrained(back)(ids)))
    reader = HFCheckpoint(hf_dir)
    print(f"[3/3] exported to HF safetensors ({len(reader.names())} tensors) and back: identical logits: {same}")
    print(f"done in {time.perf_counter() - t0:.0f}s: {correct}/3 answers right; try "
          f"`jaxlm chat --model {final} --system '' --greedy`")
    return 0 if same and correct >= 2 else 1

"""Tiny SFT: the bundled tiny InternLM2 learns to name capitals, on 2 CPU cores in about a minute.

    jaxlm train --config experiments/tiny_sft.py --workdir /tmp/tiny_sft
    jaxlm chat --model /tmp/tiny_sft/final --system "" --greedy

The data (jaxlm/assets/tiny/*.jsonl) asks for the capital of 40 countries;
the eval file asks with phrasings never trained on.
"""

import os

from jaxlm.assets import TINY_DIR
from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelSection(name="tiny", dtype="float32", scan_layers=True, remat="none", attention_impl="xla"),
        data=DataSection(train_files=(os.path.join(TINY_DIR, "train.jsonl"),),
                         eval_files=(os.path.join(TINY_DIR, "eval.jsonl"),), format="chat", seq_len=128),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, total_steps=300, min_lr_ratio=0.05,
                                  weight_decay=0.01, b2=0.98, clip_norm=1.0),
        lora=LoRAConfig(enabled=False),
        mesh="fsdp=-1",
        steps=300,
        global_batch=16,
        micro_batches=1,
        checkpoint_every=100,
        keep_checkpoints=2,
        log_every=20,
        eval_every=100,
        seed=0,
    )

"""LoRA SFT of InternLM2-1.8B on a Colab TPU (one v5e chip, 16 GiB).

    jaxlm train --config experiments/internlm2_1_8b_lora_colab.py --workdir /content/run \\
        --set model.name=/content/internlm2-1_8b --set data.train_files=/content/chats.jsonl

Memory from the planner (`jaxlm plan --preset internlm2-1_8b --train lora --batch 4 --context 2048
--device v5e`): 8.3 GiB of 16 GiB (bf16 frozen base 3.6 GiB, activations 4.5 GiB with remat full).
"""

from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelSection(name="internlm2-1_8b", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                           remat="full", attention_impl="auto"),
        data=DataSection(train_files=("data/train.jsonl",), eval_files=(), format="chat", seq_len=2048),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=20, total_steps=500),
        lora=LoRAConfig(enabled=True, rank=16, alpha=32, dropout=0.05),
        mesh="fsdp=-1",
        steps=500, global_batch=4, micro_batches=1,
        checkpoint_every=100, keep_checkpoints=2, log_every=10, eval_every=0, seed=0,
    )

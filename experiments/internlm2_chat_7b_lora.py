"""LoRA SFT of InternLM2-Chat-7B on one TPU v5e-8 (8 chips x 16 GiB) or one 80 GB GPU.

    jaxlm train --config experiments/internlm2_chat_7b_lora.py --workdir gs://bucket/chat7b-lora \\
        --set model.name=/path/to/internlm2-chat-7b --set data.train_files=my_chats.jsonl

Memory per device from the planner (`jaxlm plan --preset internlm2-chat-7b --train lora ...`):
- v5e-8, mesh fsdp=8, batch 8 x 4096 tokens: 5.62 GiB of 16 GiB (39% of the usable 90%)
- one A100/H100 80 GB, batch 4 x 4096 tokens (`--set mesh=fsdp=1 --set global_batch=4`): 24.8 GiB
"""

from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelSection(name="internlm2-chat-7b", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                           remat="full", attention_impl="auto"),
        data=DataSection(train_files=("data/train.jsonl",), eval_files=("data/eval.jsonl",), format="chat",
                         seq_len=4096),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=50, total_steps=2000, weight_decay=0.0),
        lora=LoRAConfig(enabled=True, rank=16, alpha=32, dropout=0.05),
        mesh="fsdp=-1",
        steps=2000, global_batch=8, micro_batches=1,
        checkpoint_every=200, keep_checkpoints=3, log_every=10, eval_every=200, seed=0,
    )

"""Full-parameter SFT of InternLM2-7B with FSDP on a TPU v5p-32 slice (16 chips) or 8 GPUs.

    # every host of the slice runs the same command (see scripts/tpu_vm/ and the README)
    jaxlm train --config experiments/internlm2_7b_full_sft.py --workdir gs://bucket/7b-sft \\
        --set model.name=/path/to/internlm2-7b --set data.train_files=my_chats.jsonl

Memory per device from the planner (`jaxlm plan --preset internlm2-7b --train full ...`):
- v5p-32 (16 chips x 95 GiB), mesh fsdp=16, batch 32 x 4096: 13.7 GiB (float32 master weights,
  gradients and AdamW moments split 16 ways, remat full)
- 8 x H100 80 GB, mesh fsdp=8, batch 8 x 4096 (`--set global_batch=8`): 18.5 GiB
"""

from jaxlm.train.config import DataSection, ModelSection, TrainConfig
from jaxlm.train.lora import LoRAConfig
from jaxlm.train.step import OptimizerConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelSection(name="internlm2-7b", dtype="bfloat16", param_dtype="float32", scan_layers=True,
                           remat="full", attention_impl="auto"),
        data=DataSection(train_files=("data/train.jsonl",), eval_files=("data/eval.jsonl",), format="chat",
                         seq_len=4096),
        optimizer=OptimizerConfig(learning_rate=1e-5, warmup_steps=100, total_steps=3000, weight_decay=0.1,
                                  clip_norm=1.0),
        lora=LoRAConfig(enabled=False),
        mesh="fsdp=-1",
        steps=3000, global_batch=32, micro_batches=1,
        checkpoint_every=250, keep_checkpoints=2, log_every=10, eval_every=250, seed=0,
    )

"""Fine-tuning: the sharded train step, data, LoRA, checkpoints and the loop."""

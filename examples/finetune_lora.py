"""Journey 2: LoRA fine-tuning from an experiment config, then export and reload.

    python examples/finetune_lora.py [--config experiments/tiny_sft.py] [--workdir DIR] [--steps N]

Trains LoRA adapters (rank 16 on wqkv, wo, w1, w2, w3) with the experiment's
data and optimizer, writes the adapter in PEFT's layout and the merged model,
loads the merged model back and checks it answers as the trained one did.
"""

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "experiments", "tiny_sft.py"))
    parser.add_argument("--model", default=None, help="base checkpoint (default: the config's model)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--question", default="What is the capital of Japan?")
    args = parser.parse_args()

    from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
    from jaxlm.train.config import load_experiment
    from jaxlm.train.trainer import train

    overrides = [f"steps={args.steps}", "lora.enabled=true", "lora.rank=16", "lora.alpha=32",
                 "lora.dropout=0.0", "optimizer.learning_rate=1e-2"]
    if args.model:
        overrides.append(f"model.name={args.model}")
    cfg = load_experiment(args.config, overrides)
    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxlm-lora-")
    result = train(cfg, workdir, progress=False, log=print)
    losses = [loss for _, loss in result["losses"]]
    print(f"LoRA loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    print(f"adapter (PEFT layout): {os.path.join(workdir, 'adapter')}: {sorted(os.listdir(os.path.join(workdir, 'adapter')))}")

    merged = InternLM2ForCausalLM.from_pretrained(result["final"])
    tokenizer = InternLM2Tokenizer.from_pretrained(result["final"])
    answer, _ = merged.chat(tokenizer, args.question, meta_instruction="", do_sample=False, max_new_tokens=24)
    print(f"merged model, reloaded from {result['final']}:\nuser: {args.question}\nassistant: {answer}")


if __name__ == "__main__":
    sys.exit(main())

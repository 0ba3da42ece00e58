"""Journey 4: what each host of a TPU pod slice (or GPU cluster) runs.

    # on every host, same command (scripts/tpu_vm/launch.sh does this for you):
    python examples/multihost_launch.py --config experiments/internlm2_7b_full_sft.py --workdir gs://bucket/run
    python examples/multihost_launch.py --model /ckpt/internlm2-chat-7b --mesh fsdp=4,context=8 --prompt-tokens 200000

Every host calls jaxlm.distributed.initialize() (automatic on TPU VMs; from
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID elsewhere), builds the
same mesh over all devices, and then trains from an experiment config or runs
long-context inference. Without arguments it runs the tiny default as one process.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment file: train")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model", default=None, help="checkpoint: long-context inference")
    parser.add_argument("--mesh", default="fsdp=-1")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=8192)
    args = parser.parse_args()

    import jax

    import jaxlm.distributed

    info = jaxlm.distributed.initialize()
    main_host = info["process_id"] == 0
    if main_host:
        print(f"process {info['process_id']} of {info['num_processes']}: {info['local_devices']} local devices, "
              f"{info['devices']} in all")

    if args.model is None and args.config is None:
        args.config = os.path.join(REPO, "experiments", "tiny_sft.py")
        args.overrides += ["steps=20", "log_every=10", "eval_every=0"]
        if main_host:
            print("no --config/--model: fine-tuning the tiny default for 20 steps")
    if args.config:
        from jaxlm.train.config import load_experiment
        from jaxlm.train.trainer import train

        import tempfile

        cfg = load_experiment(args.config, args.overrides + [f"mesh={args.mesh}"])
        result = train(cfg, args.workdir or tempfile.mkdtemp(prefix="jaxlm-multihost-"), progress=False,
                       log=print if main_host else (lambda m: None))
        if main_host:
            print(f"trained to loss {result['losses'][-1][1]:.4f}; final model {result['final']}")
        return

    import numpy as np

    from jaxlm import InternLM2ForCausalLM
    from jaxlm.sharding import make_mesh

    mesh = make_mesh(args.mesh)
    model = InternLM2ForCausalLM.from_pretrained(args.model, mesh=mesh, dtype="bfloat16",
                                                 max_context=args.prompt_tokens + 256)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, args.prompt_tokens))
    out = model.generate(ids, max_new_tokens=16, prefill_chunk_size=args.chunk)
    if main_host:
        print(f"generated {out.shape[1] - args.prompt_tokens} tokens after a {args.prompt_tokens}-token prompt "
              f"on mesh {dict(mesh.shape)} across {jax.process_count()} processes")


if __name__ == "__main__":
    main()

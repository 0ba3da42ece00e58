"""Base checkpoint + LoRA adapter (PEFT layout) -> merged HF InternLM2 directory.

    python -m checkpoints_convert.merge_lora --base BASE_DIR --adapter ADAPTER_DIR --dst OUT \\
        [--max-shard-size 5GB] [--overwrite]

BASE_DIR is an HF or jaxlm checkpoint. Each target weight becomes
``W + (alpha / r) * B @ A`` (computed in float64, stored in W's dtype); the
rest is copied. Streaming, one tensor at a time.
"""

import argparse
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.merge_lora",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--base", required=True, help="base HF or jaxlm checkpoint directory")
    parser.add_argument("--adapter", required=True, help="directory with adapter_model.safetensors")
    parser.add_argument("--dst", required=True, help="output HF directory")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.hub import resolve_model_path
    from jaxlm.checkpoint.convert import write_hf
    from jaxlm.train.lora import merged_tensor, read_adapter

    with user_errors():
        _, deltas = read_adapter(args.adapter)
        info = write_hf(resolve_model_path(args.base), args.dst, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite,
                        transform=lambda name, w: merged_tensor(name, w, deltas))
    print(f"wrote {info['dst']} ({len(deltas)} adapted modules, {info['bytes'] / 1e6:.1f} MB)")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""HF InternLM2 directory -> jaxlm (Orbax) checkpoint.

    python -m checkpoints_convert.hf_to_jaxlm --src HF_DIR --dst OUT [--dtype bfloat16|float32] [--overwrite]
"""

import argparse
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.hf_to_jaxlm",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="HF or InternEvo checkpoint directory, or a hub id")
    parser.add_argument("--dst", required=True, help="output jaxlm checkpoint directory")
    parser.add_argument("--dtype", default=None, metavar="{bfloat16,float32}",
                        help="cast weights (default: keep the stored dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.hub import resolve_model_path
    from jaxlm.checkpoint.convert import hf_to_jaxlm

    with user_errors():
        info = hf_to_jaxlm(resolve_model_path(args.src), args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights"
          f"{', copied ' + ', '.join(info['copied']) if info['copied'] else ''})")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

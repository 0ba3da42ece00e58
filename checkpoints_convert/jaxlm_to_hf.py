"""jaxlm checkpoint -> HF InternLM2 directory (safetensors under the original names).

    python -m checkpoints_convert.jaxlm_to_hf --src JAXLM_DIR --dst HF_DIR [--max-shard-size 5GB] [--overwrite]
"""

import argparse
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.jaxlm_to_hf",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="jaxlm checkpoint directory")
    parser.add_argument("--dst", required=True, help="output HF directory")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.hub import resolve_model_path
    from jaxlm.checkpoint.convert import jaxlm_to_hf

    with user_errors():
        info = jaxlm_to_hf(resolve_model_path(args.src), args.dst, max_shard_size=args.max_shard_size,
                           overwrite=args.overwrite)
    print(f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB in {len(info['files'])} "
          f"safetensors file(s))")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""HF InternLM2 directory -> InternEvo "Origin" checkpoint, split for tensor and pipeline parallelism.

    python -m checkpoints_convert.hf_to_internevo --src HF_DIR --dst ORIGIN_DIR --tp T --pp P [--overwrite]

Writes exactly model_tp{t}_pp{p}.pt for every t < T, p < P and model_config.pt,
as InternEvo saves and loads them: layers over stages by its uniform partition
(the extra layers on the last stages), local layer numbers, the embedding on
stage 0 and norm/output on the last, the source dtype kept.
"""

import argparse
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.hf_to_internevo",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="HF checkpoint directory (safetensors or .bin), or a hub id")
    parser.add_argument("--dst", required=True, help="output InternEvo checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.hub import resolve_model_path
    from jaxlm.checkpoint.internevo import write_origin

    with user_errors():
        info = write_origin(resolve_model_path(args.src), args.dst, tp=args.tp, pp=args.pp,
                            overwrite=args.overwrite)
    print(f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights in "
          f"{len(info['files'])} shard(s) + model_config.pt)")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

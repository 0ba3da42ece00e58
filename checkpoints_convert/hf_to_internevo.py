"""HF InternLM2 directory -> InternEvo "Origin" checkpoint, split for tensor and pipeline parallelism.

    python -m checkpoints_convert.hf_to_internevo --src HF_DIR --dst ORIGIN_DIR --tp T --pp P [--overwrite]

Writes exactly model_tp{t}_pp{p}.pt for every t < T, p < P and model_config.pt,
as InternEvo saves and loads them: layers over stages by its uniform partition
(the extra layers on the last stages), local layer numbers, the embedding on
stage 0 and norm/output on the last, the source dtype kept.
"""

import sys

from checkpoints_convert._cli import converter_entry, converter_parser
from jaxlm.checkpoint.internevo_write import write_origin


def build_parser(parser=None):
    parser = converter_parser("hf_to_internevo", __doc__, parser, dst_help="output InternEvo checkpoint directory",
                              src_help="HF checkpoint directory (safetensors or .bin), or a hub id")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    return parser


run, main = converter_entry(
    build_parser, lambda args, src: write_origin(src, args.dst, tp=args.tp, pp=args.pp, overwrite=args.overwrite),
    lambda info: f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights in "
                 f"{len(info['files'])} shard(s) + model_config.pt)")

if __name__ == "__main__":
    sys.exit(main())

"""HF InternLM2 directory -> jaxlm (Orbax) checkpoint.

    python -m checkpoints_convert.hf_to_jaxlm --src HF_DIR --dst OUT [--dtype bfloat16|float32] [--overwrite]
"""

import sys

from checkpoints_convert._cli import converter_entry, converter_parser, copied_note
from jaxlm.checkpoint.convert import hf_to_jaxlm


def build_parser(parser=None):
    parser = converter_parser("hf_to_jaxlm", __doc__, parser, src_help="HF or InternEvo checkpoint directory, "
                              "or a hub id", dst_help="output jaxlm checkpoint directory")
    parser.add_argument("--dtype", default=None, metavar="{bfloat16,float32}",
                        help="cast weights (default: keep the stored dtype)")
    return parser


run, main = converter_entry(
    build_parser, lambda args, src: hf_to_jaxlm(src, args.dst, dtype=args.dtype, overwrite=args.overwrite),
    lambda info: f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights{copied_note(info)})")

if __name__ == "__main__":
    sys.exit(main())

"""jaxlm checkpoint -> HF InternLM2 directory (safetensors under the original names).

    python -m checkpoints_convert.jaxlm_to_hf --src JAXLM_DIR --dst HF_DIR [--max-shard-size 5GB] [--overwrite]
"""

import sys

from checkpoints_convert._cli import add_max_shard_size, converter_entry, converter_parser
from jaxlm.checkpoint.convert import jaxlm_to_hf


def build_parser(parser=None):
    parser = converter_parser("jaxlm_to_hf", __doc__, parser, src_help="jaxlm checkpoint directory (or a hub id)",
                              dst_help="output HF directory")
    add_max_shard_size(parser)
    return parser


run, main = converter_entry(
    build_parser,
    lambda args, src: jaxlm_to_hf(src, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite),
    lambda info: f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB in {len(info['files'])} safetensors file(s))")

if __name__ == "__main__":
    sys.exit(main())

"""InternEvo "Origin" checkpoint -> HF InternLM2 directory (safetensors).

    python -m checkpoints_convert.internevo_to_hf --src ORIGIN_DIR --dst HF_DIR [--config HF_CONFIG_JSON] \\
        [--tokenizer DIR] [--max-shard-size 5GB] [--overwrite]

ORIGIN_DIR holds model_tp{t}_pp{p}.pt (or model_wp{w}_pp{p}.pt) shards and
model_config.pt, as InternEvo saves them; other trainer files are ignored and
the directory is only read. Without InternEvo installed.
"""

import sys

from checkpoints_convert._cli import add_max_shard_size, converter_entry, converter_parser, copied_note
from jaxlm.checkpoint.convert import write_hf
from jaxlm.checkpoint.internevo import is_origin_checkpoint
from jaxlm.checkpoint.internevo_config import rotary_order_stated
from jaxlm.errors import CheckpointError

ASSUMED_ROTARY = ("note: the model config states neither qk_interleaved nor adapt_hf; the q/k rows were taken as "
                  "interleaved, as InternEvo's own converter does")


def build_parser(parser=None):
    parser = converter_parser("internevo_to_hf", __doc__, parser, src_help="InternEvo checkpoint directory "
                              "(or a hub id)", dst_help="output HF directory")
    parser.add_argument("--config", default=None, metavar="HF_CONFIG_JSON",
                        help="the model's HF config.json: used instead of (or checked against) model_config.pt; "
                             "its max_position_embeddings, rope_scaling and token ids carry into the output")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="copy tokenizer.model, tokenizer_config.json, ... from this directory")
    add_max_shard_size(parser)
    return parser


def convert(args, src: str) -> dict:
    if not is_origin_checkpoint(src):
        raise CheckpointError(f"{src}: not an InternEvo checkpoint (no model_tp{{t}}_pp{{p}}.pt or "
                              f"model_wp{{w}}_pp{{p}}.pt files)")
    info = write_hf(src, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                    hf_config=args.config, sidecar_dir=args.tokenizer)
    return {**info, "rotary_assumed": not rotary_order_stated(src)}


run, main = converter_entry(
    build_parser, convert,
    lambda info: f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB in {len(info['files'])} safetensors file(s)"
                 f"{copied_note(info)})" + (f"\n{ASSUMED_ROTARY}" if info["rotary_assumed"] else ""))

if __name__ == "__main__":
    sys.exit(main())

"""InternEvo "Origin" checkpoint -> HF InternLM2 directory (safetensors).

    python -m checkpoints_convert.internevo_to_hf --src ORIGIN_DIR --dst HF_DIR [--config HF_CONFIG_JSON] \\
        [--tokenizer DIR] [--max-shard-size 5GB] [--overwrite]

ORIGIN_DIR holds model_tp{t}_pp{p}.pt (or model_wp{w}_pp{p}.pt) shards and
model_config.pt, as InternEvo saves them; other trainer files are ignored and
the directory is only read. Without InternEvo installed.
"""

import argparse
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.internevo_to_hf",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="InternEvo checkpoint directory (or a hub id)")
    parser.add_argument("--dst", required=True, help="output HF directory")
    parser.add_argument("--config", default=None, metavar="HF_CONFIG_JSON",
                        help="the model's HF config.json: used instead of (or checked against) model_config.pt; "
                             "its max_position_embeddings, rope_scaling and token ids carry into the output")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="copy tokenizer.model, tokenizer_config.json, ... from this directory")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.convert import write_hf
    from jaxlm.checkpoint.hub import resolve_model_path
    from jaxlm.checkpoint.internevo import is_origin_checkpoint, rotary_order_stated
    from jaxlm.errors import CheckpointError

    with user_errors():
        src = resolve_model_path(args.src)
        if not is_origin_checkpoint(src):
            raise CheckpointError(f"{src}: not an InternEvo checkpoint (no model_tp{{t}}_pp{{p}}.pt or "
                                  f"model_wp{{w}}_pp{{p}}.pt files)")
        info = write_hf(src, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        hf_config=args.config, sidecar_dir=args.tokenizer)
    print(f"wrote {info['dst']} ({info['bytes'] / 1e6:.1f} MB in {len(info['files'])} safetensors file(s)"
          f"{', copied ' + ', '.join(info['copied']) if info['copied'] else ''})")
    if not rotary_order_stated(src):
        print("note: the model config states neither qk_interleaved nor adapt_hf; the q/k rows were taken as "
              "interleaved, as InternEvo's own converter does")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""HF or jaxlm checkpoint -> quantized jaxlm checkpoint (weight-only int8 or int4).

    python -m checkpoints_convert.quantize --src DIR --dst OUT --bits 8|4 [--quantize-output] [--overwrite]

int8: one scale per output channel; int4: one scale per 128 inputs. The
embedding and norms (and the output head, unless --quantize-output) keep
their dtype. ``InternLM2ForCausalLM.from_pretrained(OUT)`` loads it quantized.
"""

import argparse
import sys

from jaxlm.cli_util import one_line_usage_errors, quiet_runtime_logs, user_errors


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m checkpoints_convert.quantize",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--src", required=True, help="HF or float jaxlm checkpoint directory")
    parser.add_argument("--dst", required=True, help="output jaxlm checkpoint directory")
    # a plain string checked in run(): argparse's `choices` error prints two lines (usage, error)
    parser.add_argument("--bits", required=True, metavar="{8,4}", help="8 (int8) or 4 (int4)")
    parser.add_argument("--quantize-output", action="store_true", help="quantize the output head too")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return one_line_usage_errors(parser)


def run(args) -> int:
    quiet_runtime_logs()
    from jaxlm.checkpoint.quantized import mode_of_bits, quantize_checkpoint

    with user_errors():
        info = quantize_checkpoint(args.src, args.dst, mode=mode_of_bits(args.bits), overwrite=args.overwrite,
                                   quantize_output=args.quantize_output)
    print(f"wrote {info['dst']} ({info['mode']}, {info['bytes'] / 1e6:.1f} MB; other weights {info['dtype']}"
          f"{', copied ' + ', '.join(info['copied']) if info['copied'] else ''})")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

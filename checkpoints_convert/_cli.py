"""What every converter's command line shares, so each module states only its own options and call.

A converter builds its parser with `converter_parser` (``--src``, ``--dst``,
``--overwrite``, argparse errors as one line) and gets its ``run(args)`` and
``main(argv)`` from `converter_entry`, given its conversion and summary line:
``--src`` resolved through `jaxlm.checkpoint.hub` (a hub id to its snapshot),
quiet runtime logs, jaxlm errors as one line on stderr and exit 1. The
conversions themselves write to a temporary directory
renamed into place (`jaxlm.files.atomic_output_dir`), so nothing is left at
``--dst`` when they fail.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from jaxlm.checkpoint.hub import resolve_model_path
from jaxlm.cli_util import quiet_runtime_logs, user_errors


def _one_line_error(message: str):
    # argparse's own error prints the usage as well: two lines, where jaxlm's CLIs print one
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def converter_parser(module: str, doc: str, parser: argparse.ArgumentParser | None = None, *,
                     src_help: str, dst_help: str) -> argparse.ArgumentParser:
    """``parser`` (a ``jaxlm`` subcommand's) or a new one for ``python -m checkpoints_convert.<module>``,
    with the source, ``--dst`` and ``--overwrite``; the module adds its own options after."""
    parser = parser or argparse.ArgumentParser(prog=f"python -m checkpoints_convert.{module}",
                                               description=doc.strip().splitlines()[0])
    parser.error = _one_line_error
    parser.add_argument("--src", required=True, help=src_help)
    parser.add_argument("--dst", required=True, help=dst_help)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    return parser


def add_max_shard_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")


def copied_note(info: dict) -> str:
    """', copied tokenizer.model, ...' for the sidecar files a conversion copied, else ''."""
    return f", copied {', '.join(info['copied'])}" if info.get("copied") else ""


def converter_entry(build_parser: Callable[[], argparse.ArgumentParser],
                    convert: Callable[[argparse.Namespace, str], dict], summary: Callable[[dict], str]):
    """``(run(args) -> int, main(argv=None) -> int)`` of a converter: ``convert(args, src)`` gets
    ``--src`` resolved (a hub id to its snapshot), runs with jaxlm's CLI error handling
    (one line on stderr, exit 1) and its info's ``summary`` is printed."""
    def run(args) -> int:
        quiet_runtime_logs()
        with user_errors():
            info = convert(args, resolve_model_path(args.src))
        print(summary(info))
        return 0

    def main(argv=None) -> int:
        return run(build_parser().parse_args(argv))

    return run, main

"""The ``jaxlm`` command (``python -m jaxlm`` does the same).

Subcommands are listed in `COMMANDS` by module name; each module exposes
``build_parser(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("jaxlm.commands.demo", "run the main job on the bundled tiny default model"),
    "convert-hf-to-jaxlm": ("checkpoints_convert.hf_to_jaxlm", "HF directory -> jaxlm checkpoint"),
    "convert-jaxlm-to-hf": ("checkpoints_convert.jaxlm_to_hf", "jaxlm checkpoint -> HF safetensors"),
    "info": ("jaxlm.commands.info", "show a checkpoint's config and parameter count"),
    "generate": ("jaxlm.commands.generate", "complete one prompt (for scripts)"),
    "chat": ("jaxlm.commands.chat", "interactive streaming chat"),
    "plan": ("jaxlm.commands.plan", "bytes per device of a run, and whether it fits"),
    "train": ("jaxlm.commands.train", "fine-tune (full or LoRA) from an experiment config; resumes"),
    "eval": ("jaxlm.commands.eval", "long-context evaluations: ppl, needle, passkey"),
    "serve": ("jaxlm.commands.serve", "OpenAI-compatible HTTP server: continuous batching, paged KV cache"),
    "chat-web": ("jaxlm.commands.chat_web", "jaxlm serve, printing the URL of its chat page in the browser"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlm", description="InternLM2 in JAX / Flax NNX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        importlib.import_module(module).build_parser(sp)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # before the commands import jax: no C++ INFO chatter
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return importlib.import_module(args._module).run(args)


if __name__ == "__main__":
    sys.exit(main())

"""``jaxlm chat --model DIR``: an interactive, streaming chat.

Commands at the prompt: ``/reset`` forgets the conversation, ``/exit`` quits.
"""

import sys

from jaxlm.chat import DEFAULT_META_INSTRUCTION
from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.commands.common import (Rate, add_model_args, add_sampling_args, load_model_and_tokenizer,
                                   sampling_kwargs)


def build_parser(parser):
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: InternLM2's)")
    add_sampling_args(parser, do_sample=True, temperature=0.8, top_p=0.8, max_new_tokens=1024)
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        model, tokenizer = load_model_and_tokenizer(args)
    meta = DEFAULT_META_INSTRUCTION if args.system is None else args.system
    kwargs = sampling_kwargs(args)
    history = []
    interactive = sys.stdin.isatty()
    print("jaxlm chat: /reset clears the conversation, /exit quits", file=sys.stderr)
    total = Rate()
    while True:
        try:
            query = input("user> " if interactive else "")
        except EOFError:
            break
        query = query.strip()
        if not query:
            continue
        if query == "/exit":
            break
        if query == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        print("assistant> ", end="", flush=True)
        shown, rate = "", Rate()
        with user_errors():
            for response, new_history in model.stream_chat(tokenizer, query, history, meta_instruction=meta,
                                                           **kwargs):
                rate.tick()
                total.tick()
                print(response[len(shown):], end="", flush=True)
                shown = response
        history = new_history if shown or rate.tokens else history
        print()
        print(f"[{rate.summary()}]", file=sys.stderr)
    print(total.summary(), file=sys.stderr)
    return 0

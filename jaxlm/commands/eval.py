"""``jaxlm eval ppl|needle|passkey``: long-context evaluations.

    jaxlm eval ppl --model DIR --data FILE --context N --stride S [--chunk C]
    jaxlm eval needle --model DIR --lengths 4k,16k --depths 0,50,100 --out DIR
    jaxlm eval passkey --model DIR --lengths 4k,16k --depths 0,50,100 --out DIR
"""

import json
import sys

from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.commands.common import load_model_and_tokenizer
from jaxlm.eval.needle import build_parser as needle_parser
from jaxlm.eval.needle import main_args
from jaxlm.eval.ppl import perplexity, read_text


def build_parser(parser):
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK", required=True)
    ppl = sub.add_parser("ppl", help="sliding-window perplexity of a text file")
    ppl.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ppl.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model's files)")
    ppl.add_argument("--data", required=True, help="plain text, or JSONL with a 'text' field")
    ppl.add_argument("--context", type=int, required=True, help="window length in tokens")
    ppl.add_argument("--stride", type=int, required=True, help="tokens between window starts")
    ppl.add_argument("--chunk", type=int, default=None, help="run each window in chunks of this many tokens")
    ppl.add_argument("--dtype", default=None)
    ppl.add_argument("--json", action="store_true")
    needle_parser(sub.add_parser("needle", help="needle in a haystack (see python -m jaxlm.eval.needle)"))
    passkey = needle_parser(sub.add_parser("passkey", help="passkey retrieval"))
    passkey.set_defaults(passkey=True)
    return parser


def run(args) -> int:
    if args.eval_command in ("needle", "passkey"):
        return main_args(args)
    quiet_runtime_logs()
    with user_errors():
        model, tokenizer = load_model_and_tokenizer(args)
        result = perplexity(model, tokenizer.encode(read_text(args.data)), args.context, args.stride, args.chunk)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['scored']} tokens "
              f"({result['windows']} windows of {args.context}, stride {args.stride})")
    print(f"{result['tokens']} tokens", file=sys.stderr)
    return 0

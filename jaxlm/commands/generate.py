"""``jaxlm generate --model DIR --prompt TEXT``: one completion, for scripts."""

import json
import sys

from jaxlm.chat import DEFAULT_META_INSTRUCTION
from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.runtime.generate import chat_inputs
from jaxlm.commands.common import (Rate, add_model_args, add_sampling_args, load_model_and_tokenizer,
                                   sampling_kwargs)


def build_parser(parser):
    add_model_args(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the chat format (default system prompt) and stop at <|im_end|>")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_sampling_args(parser, do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=128)
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        model, tokenizer = load_model_and_tokenizer(args)
        kwargs = sampling_kwargs(args)
        rate = Rate()
        if args.chat:
            prompt_ids, eos = chat_inputs(tokenizer, args.prompt, [], DEFAULT_META_INSTRUCTION)
            kwargs["eos_token_id"] = eos
        else:
            prompt_ids = [tokenizer.encode(args.prompt)]
        new = []
        for token in model.stream_generate(prompt_ids, **kwargs):
            rate.tick()
            new.append(int(token[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        if args.chat:
            text = text.split("<|im_end|>")[0]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "prompt_tokens": len(prompt_ids[0]),
                          "completion_tokens": len(new), "token_ids": new}, ensure_ascii=False))
    else:
        print(text)
    print(rate.summary(), file=sys.stderr)
    return 0


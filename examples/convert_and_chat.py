"""Journey 1: take an HF InternLM2 checkpoint, convert it, and chat with it (streaming).

    python examples/convert_and_chat.py [--model HF_DIR] [--workdir DIR] [--question TEXT ...]

Without --model it uses the bundled tiny InternLM2 with random weights (its
answers are noise; the point is the pipeline). With a real checkpoint, e.g.
internlm2-chat-1_8b downloaded with `huggingface-cli download internlm/internlm2-chat-1_8b`,
the answers are the model's.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", help="HF checkpoint directory (default: the tiny default)")
    parser.add_argument("--workdir", default=None, help="where the converted checkpoint goes")
    parser.add_argument("--question", action="append", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
    from jaxlm.checkpoint.convert import hf_to_jaxlm

    if args.model is None:
        from _tiny import tiny_hf_checkpoint

        args.model = tiny_hf_checkpoint()
        print(f"no --model: using the bundled tiny InternLM2 with random weights ({args.model})")
    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxlm-journey-")

    # 1. convert HF -> jaxlm (streaming, bit-exact; tokenizer files travel along)
    t = time.perf_counter()
    converted = os.path.join(workdir, "jaxlm")
    info = hf_to_jaxlm(args.model, converted, overwrite=True)
    print(f"converted to {converted}: {info['bytes'] / 1e6:.1f} MB of {info['dtype']} weights "
          f"in {time.perf_counter() - t:.1f}s")

    # 2. load and chat, streaming each answer as it is generated
    model = InternLM2ForCausalLM.from_pretrained(converted)
    tokenizer = InternLM2Tokenizer.from_pretrained(converted)
    history = []
    for question in args.question or ["Hello! Who are you?", "What is the capital of France?"]:
        print(f"user: {question}\nassistant: ", end="", flush=True)
        shown = ""
        for response, history in model.stream_chat(tokenizer, question, history, do_sample=False,
                                                   max_new_tokens=args.max_new_tokens):
            print(response[len(shown):], end="", flush=True)
            shown = response
        print()
    print(f"chat done: {len(history)} turns")


if __name__ == "__main__":
    main()

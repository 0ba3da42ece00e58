"""Journey 3: plan a long run, prefill in chunks, and draw a needle-in-a-haystack heatmap.

    python examples/long_context_needle.py [--model DIR] [--lengths 2k,4k] [--out DIR]

Without --model it uses the bundled tiny InternLM2 (random weights: the
heatmap shows misses; the point is the pipeline). On a TPU/GPU with
internlm2-chat-7b, use --lengths 4k,16k,64k,128k,200k and --chunk 8192.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--lengths", default="1k,2k")
    parser.add_argument("--depths", default="0,50,100")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import numpy as np

    from jaxlm import InternLM2ForCausalLM, InternLM2Tokenizer
    from jaxlm.eval.needle import heatmap, parse_lengths, run
    from jaxlm.plan import plan_memory

    if args.model is None:
        from _tiny import tiny_hf_checkpoint

        args.model = tiny_hf_checkpoint()
        print(f"no --model: using the bundled tiny InternLM2 with random weights ({args.model})")
    lengths = parse_lengths(args.lengths)
    model = InternLM2ForCausalLM.from_pretrained(args.model, max_context=max(lengths) + 256)
    tokenizer = InternLM2Tokenizer.from_pretrained(args.model)

    # 1. will the longest prompt fit? (bytes per device, before anything runs)
    plan = plan_memory(model.config, context=max(lengths) + 64, chunk=args.chunk, dtype="float32")
    print(f"plan for {max(lengths)} tokens, chunk {args.chunk}:\n{plan.table()}")

    # 2. chunked prefill gives the unchunked logits
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 700))
    full, chunked = np.asarray(model(ids)), np.asarray(model(ids, chunk_size=args.chunk // 2))
    print(f"chunked vs unchunked logits on 700 tokens: max difference {np.abs(full - chunked).max():.2e}")

    # 3. the needle heatmap
    out = args.out or tempfile.mkdtemp(prefix="jaxlm-needle-")
    os.makedirs(out, exist_ok=True)
    results = run(model, tokenizer, lengths, [float(d) for d in args.depths.split(",")], chunk=args.chunk)
    png = heatmap(results, os.path.join(out, "heatmap.png"), "needle in a haystack")
    print(f"score {np.mean([r['score'] for r in results]):.0%} over {len(results)} prompts; heatmap: {png}")


if __name__ == "__main__":
    main()

"""Needle in a haystack (and passkey retrieval), scored by exact match, with a heatmap.

    python -m jaxlm.eval.needle --model DIR --lengths 4k,16k,64k,128k,200k \\
        --depths 0,25,50,75,100 --out DIR [--passkey] [--chunk 4096] [--mesh context=8 [--context-attention ring]]

For every (length, depth): a prompt of that many tokens (model's tokenizer,
within 1%) with a fact at that depth, then greedy decoding; the score is 1
when the answer contains the hidden number. Writes ``results.json`` and
``heatmap.png`` (score by length and depth).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.errors import JaxlmError
from jaxlm.eval import haystack
from jaxlm.files import atomic_output_dir
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.options import CONTEXT_ATTENTION
from jaxlm.sharding import make_mesh
from jaxlm.tokenizer import InternLM2Tokenizer


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1000 if part.endswith("k") else 1
        out.append(int(float(part.rstrip("k")) * mult))
    return out


def run(model, tokenizer, lengths, depths, *, passkey: bool = False, chunk: int | None = None,
        max_new_tokens: int = 24, kv_cache_dtype=None, seed: int = 0, log=print) -> list[dict]:
    rng = random.Random(seed)
    results = []
    for length in lengths:
        for depth in depths:
            if passkey:
                needle, question, answer, intro = haystack.passkey_case(rng)
            else:
                (needle, question, answer), intro = haystack.needle_case(rng), ""
            prompt = haystack.build(tokenizer, length, depth, needle, question, answer, intro=intro, seed=seed)
            t = time.perf_counter()
            out = model.generate([prompt.ids], max_new_tokens=max_new_tokens, do_sample=False,
                                 prefill_chunk_size=chunk, kv_cache_dtype=kv_cache_dtype)
            reply = tokenizer.decode(out[0, len(prompt.ids):], skip_special_tokens=True).split("<|im_end|>")[0]
            row = {"length": length, "depth": depth, "prompt_tokens": len(prompt.ids),
                   "needle_token": prompt.needle_token, "achieved_depth": round(100 * prompt.depth, 2),
                   "answer": answer, "reply": reply, "score": float(answer in reply),
                   "seconds": round(time.perf_counter() - t, 2)}
            results.append(row)
            log(f"length {length:>7} depth {depth:>5.1f}%: {'found' if row['score'] else 'missed'} "
                f"({len(prompt.ids)} tokens, {row['seconds']}s): {reply[:60]!r}")
    return results


def heatmap(results: list[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in results:
        grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["score"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1000}k" if n >= 1000 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="python -m jaxlm.eval.needle",
                                               description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="HF or jaxlm checkpoint directory")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--lengths", default="4k,16k,64k,128k,200k")
    parser.add_argument("--depths", default="0,25,50,75,100")
    parser.add_argument("--out", required=True, help="directory for results.json and heatmap.png")
    parser.add_argument("--passkey", action="store_true", help="the passkey-retrieval variant")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk size (0: no chunking)")
    parser.add_argument("--mesh", default=None, help="e.g. context=8 or fsdp=2,context=4")
    parser.add_argument("--context-attention", choices=CONTEXT_ATTENTION, default="allgather",
                        help="prefill strategy on a context axis (default allgather; ring holds less K/V)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--kv-cache-dtype", default=None, help="bfloat16, float32 or int8")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main_args(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        lengths, depths = parse_lengths(args.lengths), [float(d) for d in args.depths.split(",") if d.strip()]
        if not lengths or not depths:
            raise JaxlmError("--lengths and --depths need at least one value each")
        mesh = make_mesh(args.mesh) if args.mesh else None
        model = InternLM2ForCausalLM.from_pretrained(args.model, dtype=args.dtype, mesh=mesh,
                                                     max_context=max(lengths) + args.max_new_tokens + 64,
                                                     context_attention=args.context_attention)
        tokenizer = InternLM2Tokenizer.from_pretrained(args.tokenizer or args.model)
        log = lambda m: print(m, file=sys.stderr, flush=True)
        results = run(model, tokenizer, lengths, depths, passkey=args.passkey, chunk=args.chunk or None,
                      max_new_tokens=args.max_new_tokens, kv_cache_dtype=args.kv_cache_dtype, seed=args.seed,
                      log=log)
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            summary = {"model": args.model, "task": "passkey" if args.passkey else "needle",
                       "score": sum(r["score"] for r in results) / len(results), "results": results}
            with open(os.path.join(tmp, "results.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1, ensure_ascii=False)
            heatmap(results, os.path.join(tmp, "heatmap.png"),
                    f"{'passkey' if args.passkey else 'needle in a haystack'}: {os.path.basename(args.model)}")
    print(f"score {summary['score']:.2%} over {len(results)} prompts; wrote {args.out}/results.json and heatmap.png")
    return 0


def main(argv=None) -> int:
    return main_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

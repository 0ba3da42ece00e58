"""Options shared by the commands that load a model and generate."""

from __future__ import annotations

import time

from jaxlm.checkpoint.source import resolve_source
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.tokenizer import InternLM2Tokenizer


def add_model_args(parser, required: bool = True):
    parser.add_argument("--model", required=required,
                        help="HF, InternEvo (Origin) or jaxlm checkpoint directory, or a hub id (ORG/NAME[@REV], "
                             "modelscope:ORG/NAME)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model's files)")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32 or bfloat16 (default: stored)")
    parser.add_argument("--scan-layers", action="store_true", help="stacked layers under lax.scan")


def add_sampling_args(parser, *, do_sample: bool, temperature: float, top_p: float, max_new_tokens: int):
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sample", dest="do_sample", action="store_true", default=do_sample,
                       help="sample (default: %s)" % ("on" if do_sample else "off, greedy"))
    group.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding")
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_model_and_tokenizer(args):
    """--model (a path or hub id, resolved once) and --tokenizer (default: the model's own directory)."""
    source = resolve_source(args.model)
    tokenizer = InternLM2Tokenizer.from_pretrained(args.tokenizer or source.path)
    model = InternLM2ForCausalLM.from_pretrained(source.path, dtype=args.dtype,
                                                 scan_layers=getattr(args, "scan_layers", False))
    return model, tokenizer


class Rate:
    """Tokens per second of the decode, first token excluded from the rate's clock."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first = None
        self.tokens = 0

    def tick(self, n: int = 1):
        if self.first is None:
            self.first = time.perf_counter()
        self.tokens += n

    def summary(self) -> str:
        end = time.perf_counter()
        if not self.tokens:
            return "0 tokens"
        ttft = self.first - self.start
        rate = (self.tokens - 1) / (end - self.first) if self.tokens > 1 and end > self.first else 0.0
        return (f"{self.tokens} tokens, {rate:.1f} tokens/s after a first token at {ttft:.2f}s "
                f"({self.tokens / (end - self.start):.1f} tokens/s overall)")

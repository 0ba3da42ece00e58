"""``jaxlm info --model DIR|PRESET``: config summary and parameter count."""

import json

from jaxlm.cli_util import user_errors
from jaxlm.config import InternLM2Config


def build_parser(parser):
    parser.add_argument("--model", required=True, help="HF or jaxlm directory, or a preset name")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def run(args) -> int:
    with user_errors():
        cfg = InternLM2Config.from_pretrained(args.model)
    info = {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "max_position_embeddings": cfg.max_position_embeddings, "params": cfg.num_params()}
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>24}: {value:,}" if isinstance(value, int) else f"{key:>24}: {value}")
    return 0

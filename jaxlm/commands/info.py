"""``jaxlm info --model DIR|PRESET``: config summary, parameter count and weight bytes.

For a quantized jaxlm checkpoint the bytes are its int values and scales as
stored; ``--quantize int8|int4`` shows what quantizing a float model gives.
"""

import json
import os

from jaxlm.checkpoint import jaxlm_format
from jaxlm.checkpoint.source import model_config
from jaxlm.cli_util import user_errors
from jaxlm.options import QUANTIZE_MODES
from jaxlm.plan import fmt_bytes, weight_bytes


def build_parser(parser):
    parser.add_argument("--model", required=True, help="HF, InternEvo or jaxlm directory, a hub id, or a preset name")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="also show the weight bytes with the decoder's matrices quantized")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _stored(model: str) -> tuple[str, str | None, bool]:
    """(float dtype, quantization mode, output head quantized) of a directory (presets: bfloat16)."""
    if os.path.isdir(model) and jaxlm_format.is_jaxlm_checkpoint(model):
        marker = jaxlm_format.read_marker(model)
        return marker["param_dtype"], marker.get("quantize"), bool(marker.get("quantize_output"))
    return "bfloat16", None, False


def run(args) -> int:
    with user_errors():
        cfg = model_config(args.model)   # a preset, a directory (Origin ones too) or a hub id
        dtype, mode, head = _stored(args.model)
        if dtype not in ("float32", "bfloat16", "float16"):
            dtype = "bfloat16"
        info = {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
                "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
                "max_position_embeddings": cfg.max_position_embeddings, "params": cfg.num_params(),
                "quantize": mode, "weight_bytes": weight_bytes(cfg, dtype, mode, head)}
        if args.quantize:
            info[f"weight_bytes_{args.quantize}"] = weight_bytes(cfg, dtype, args.quantize)
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if key.startswith("weight_bytes"):
                print(f"{key:>24}: {value:,} ({fmt_bytes(value)})")
            else:
                print(f"{key:>24}: {value:,}" if isinstance(value, int) else f"{key:>24}: {value}")
    return 0

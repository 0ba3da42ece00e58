"""``jaxlm plan``: will this run fit? Bytes per device before anything starts.

    jaxlm plan --preset internlm2-chat-7b --mesh fsdp=4,tensor=2 --batch 1 --context 200000 \\
        [--train full|lora] [--dtype bfloat16] [--device-memory 16GiB | --device v5e]
"""

import json

from jaxlm.checkpoint.source import model_config
from jaxlm.cli_util import quiet_runtime_logs, user_errors
from jaxlm.options import CONTEXT_ATTENTION, QUANTIZE_MODES, REMAT_POLICIES
from jaxlm.plan import plan_memory


def build_parser(parser):
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a released model's shape (e.g. internlm2-chat-7b)")
    src.add_argument("--model", help="an HF, InternEvo or jaxlm checkpoint directory, or a hub id (reads its config)")
    parser.add_argument("--mesh", default="fsdp=1", help="mesh sizes, e.g. fsdp=4,tensor=2 (default: one device)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--train", choices=["full", "lora"], default=None, help="plan a training step")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--param-dtype", default=None,
                        help="stored weights (default: float32 for full training, else --dtype)")
    parser.add_argument("--remat", default="full", choices=REMAT_POLICIES)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--kv-cache-dtype", default=None, help="bfloat16 (default: --dtype) or int8")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk size (inference)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                        help="weight-only quantization of the decoder's matrices (inference, or --train lora)")
    parser.add_argument("--quantize-output", action="store_true", help="with --quantize: the output head too")
    parser.add_argument("--context-attention", choices=CONTEXT_ATTENTION, default="allgather",
                        help="prefill strategy on a context mesh axis (default allgather)")
    parser.add_argument("--scan-layers", choices=["on", "off"], default=None,
                        help="layers under lax.scan (default: on for training, off for inference)")
    mem = parser.add_mutually_exclusive_group()
    mem.add_argument("--device-memory", default=None, help="memory per device, e.g. 16GiB")
    mem.add_argument("--device", default=None, help="v4, v5e, v5p, v6e, a100-40g, a100-80g, h100, h200")
    parser.add_argument("--headroom", type=float, default=0.9, help="fraction of device memory to plan for")
    parser.add_argument("--json", action="store_true")
    return parser


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        config = model_config(args.preset or args.model)
        plan = plan_memory(
            config, mesh=args.mesh, batch=args.batch, context=args.context, train=args.train,
            dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, lora_rank=args.lora_rank,
            kv_cache_dtype=args.kv_cache_dtype, chunk=args.chunk,
            device=args.device or args.device_memory, headroom=args.headroom,
            context_attention=args.context_attention, quantize=args.quantize,
            quantize_output=args.quantize_output,
            scan_layers=None if args.scan_layers is None else args.scan_layers == "on")
    if args.json:
        print(json.dumps(plan.as_dict()))
    else:
        what = f"train ({args.train}, remat {args.remat})" if args.train else "inference"
        print(f"{args.preset or args.model}: {config.num_params() / 1e9:.2f}B params, {what}, "
              f"mesh {args.mesh}, batch {args.batch} x {args.context} tokens, {args.dtype}"
              + (f", weights {args.quantize}" if args.quantize else ""))
        print(plan.table())
    return 0 if plan.fits is not False else 3

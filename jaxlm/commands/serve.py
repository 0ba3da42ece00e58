"""``jaxlm serve --model DIR``: an OpenAI-compatible HTTP server with continuous batching.

Loads the model, builds the serving engine (paged KV cache, prefix caching),
compiles every program it can need, then serves on FastAPI + uvicorn:
``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``
(200 once warm), ``/metrics``. SIGTERM stops admission, lets requests in
flight (open streams too) finish, and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

import uvicorn

from jaxlm.checkpoint.source import resolve_source
from jaxlm.cli_util import one_line_usage_errors, quiet_runtime_logs, user_errors
from jaxlm.commands.common import add_model_args
from jaxlm.errors import JaxlmError
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.options import QUANTIZE_MODES
from jaxlm.runtime.generate import max_context
from jaxlm.serving.engine import Engine, EngineConfig
from jaxlm.serving.loop import AsyncEngine
from jaxlm.serving.metrics import ServerMetrics
from jaxlm.serving.server import build_app
from jaxlm.sharding import make_mesh
from jaxlm.tokenizer import InternLM2Tokenizer

GRACEFUL_SHUTDOWN_S = 25   # SIGTERM: requests in flight get this long to finish, then are cancelled


def _int_in(low: int, high: int | None, what: str):
    """An argparse ``type``: an integer in ``[low, high]``, else argparse's one-line error naming ``what``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_in(1, None, "a positive integer")
_non_negative_int = _int_in(0, None, "an integer >= 0")
_port = _int_in(0, 65535, "a port in 0..65535")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {value}")
    return value


def build_parser(parser):
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name in the API (default: the --model directory's basename)")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=8, help="requests decoding at once (default 8)")
    parser.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="longest prompt + max_tokens (default: the config's max_position_embeddings; may "
                             "exceed it, InternLM2's rotary scaling covers the rest)")
    parser.add_argument("--page-size", type=_positive_int, default=16, help="tokens per KV-cache page (default 16)")
    parser.add_argument("--kv-cache-memory", type=_positive_float, default=1.0,
                        help="GiB for the KV-cache pages (default 1)")
    parser.add_argument("--num-pages", type=_positive_int, default=None,
                        help="KV-cache pages (overrides --kv-cache-memory)")
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=None,
                        help="decode + prefill tokens per step (default: max(256, 2 x --max-num-seqs))")
    parser.add_argument("--enable-prefix-caching", default=True, action=argparse.BooleanOptionalAction,
                        help="reuse the KV pages of prompt prefixes other requests computed (default on)")
    parser.add_argument("--kv-cache-dtype", default=None, help="KV-cache dtype, e.g. int8 (default: the compute dtype)")
    parser.add_argument("--quantize", default=None, choices=QUANTIZE_MODES,
                        help="weight-only quantization of the decoder's matrices as they load (a quantized "
                             "checkpoint is served quantized without it)")
    parser.add_argument("--mesh", default=None, help="device mesh over data, fsdp and tensor, e.g. 'tensor=4' "
                                                     "(the KV pages split their kv heads over tensor)")
    parser.add_argument("--api-key", default=os.environ.get("JAXLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $JAXLM_API_KEY, or none)")
    parser.add_argument("--max-queue", type=_non_negative_int, default=256,
                        help="requests that may wait for a slot; beyond them the server answers 429 (default 256)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return one_line_usage_errors(parser)


def _listen_socket(host: str, port: int) -> socket.socket:
    """Binds now, before loading and compiling, so a busy port fails at once (uvicorn listens on it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise JaxlmError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server; the first SIGTERM/SIGINT also stops the engine's admission at once."""

    def __init__(self, config, engine: AsyncEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame):
        self.engine.stop_admission()
        super().handle_exit(sig, frame)


def run(args) -> int:
    quiet_runtime_logs()
    with user_errors():
        source = resolve_source(args.model)   # a hub id is served under that name, from its cached snapshot
        sock = _listen_socket(args.host, args.port)
        config = source.config()   # an Origin directory's from its shards
        max_model_len = args.max_model_len or config.max_position_embeddings
        default_context = 8 * config.max_position_embeddings
        mesh = make_mesh(args.mesh) if args.mesh else None
        t0 = time.perf_counter()
        tokenizer = InternLM2Tokenizer.from_pretrained(args.tokenizer or source.path)
        model = InternLM2ForCausalLM.from_pretrained(
            source.path, dtype=args.dtype, scan_layers=args.scan_layers, mesh=mesh, quantize=args.quantize,
            max_context=max_model_len if max_model_len > default_context else None)
        assert max_context(model) >= max_model_len
        batched = args.max_num_batched_tokens or max(256, 2 * args.max_num_seqs)
        engine = Engine(model, tokenizer, EngineConfig(
            max_num_seqs=args.max_num_seqs, max_model_len=max_model_len, page_size=args.page_size,
            num_pages=args.num_pages, kv_cache_memory=args.kv_cache_memory, max_num_batched_tokens=batched,
            kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=args.enable_prefix_caching))
        name = args.served_model_name or source.name
        print(f"jaxlm serve: {name} loaded in {time.perf_counter() - t0:.1f}s; max_model_len {max_model_len}, "
              f"{engine.pool.num_pages - 1} KV pages of {engine.page_size} tokens; compiling...",
              file=sys.stderr, flush=True)
        metrics = ServerMetrics()
        async_engine = AsyncEngine(engine, max_queue=args.max_queue, observer=metrics).start()
        async_engine.wait_ready()
        print(f"jaxlm serve: warm in {async_engine.warmup_seconds:.1f}s; serving on "
              f"http://{args.host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
        app = build_app(async_engine, tokenizer, model_name=name, max_model_len=max_model_len,
                        api_key=args.api_key, metrics=metrics)
        server = _Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                        lifespan="on"), async_engine)
        # uvicorn re-raises the signal it shut down on once it is done; with SIGTERM's default action
        # that would kill the process after a clean shutdown, so let SIGTERM's exit be a normal return.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run(sockets=[sock])
        logging.getLogger("jaxlm.serving").info("stopped")
    return 0

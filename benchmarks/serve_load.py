"""Serving load benchmark: jaxlm serve vs transformers serve --continuous-batching vs static generate.

    python benchmarks/serve_load.py [--requests 32] [--max-concurrency 8 | --request-rate R]
        [--peers jaxlm,static,transformers]

The client is asyncio + aiohttp with the metric definitions of LMDeploy's
``benchmark/profile_restful_api.py``: request throughput, output tokens/s,
time to first token (the first content chunk), time per output token =
(latency - TTFT) / (output tokens - 1), inter-token latency (gaps between
chunks), each as mean, median and p99. Requests arrive as a Poisson process
at ``--request-rate`` or with a fixed ``--max-concurrency``; the dataset is
random with ShareGPT-like lengths (prompts 32-256 tokens, outputs 32-64), no
downloads. Every request is greedy with ``ignore_eos`` (exactly its output
length), as the benchmark clients do.

Model: the 217M InternLM2-shaped model of ``cpu_vs_torch.py`` (random
weights, the real InternLM2 tokenizer), its Llama twin for transformers.
``static`` answers the same requests one at a time with ``model.generate``
(no server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import bench_config, llama_twin, machine, make_checkpoint  # noqa: E402

SHARED = os.environ.get("JAXLM_SHARED", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "..", "shared"))
TOKENIZER_DIR = os.path.join(SHARED, "tokenizers", "internlm2")


# ------------------------------------------------------------------ dataset
def dataset(n: int, seed: int, vocab: int, prompt_range=(32, 256), output_range=(32, 64)):
    """Random prompts (token ids, and the text they decode to) with ShareGPT-like lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        out.append((rng.integers(1000, vocab - 1000, length).tolist(), int(rng.integers(*output_range))))
    return out


# ------------------------------------------------------------------- client
async def _one(session, url, payload, key):
    """Streams one completion; returns (ttft, latency, chunk gaps, output tokens)."""
    start = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with session.post(url, json=payload, headers={"Authorization": f"Bearer {key}"} if key else {}) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content") if choices else None
            if text:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter()
    return (first or end) - start, end - start, gaps, tokens


def jaxlm_payload(model, prompt, out_len):
    return {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}


def transformers_payload(model, prompt, out_len):
    # transformers serve refuses fields outside its schema (ignore_eos is a 422); eos is
    # turned off through its per-request generation_config instead.
    return {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "generation_config": json.dumps({"eos_token_id": -1})}


async def run_load(url, requests, *, model, concurrency=None, rate=None, seed=0, key=None, timeout=600,
                   payload=jaxlm_payload):
    import aiohttp

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(concurrency or len(requests))

    async def send(session, prompt, out_len):
        async with sem:
            return await _one(session, url, payload(model, prompt, out_len), key)

    tasks = []
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for prompt, out_len in requests:
            tasks.append(asyncio.create_task(send(session, prompt, out_len)))
            if rate:
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
    return summarize(results, time.perf_counter() - start)


def summarize(results, duration):
    ttft = [r[0] for r in results]
    tpot = [(r[1] - r[0]) / (r[3] - 1) for r in results if r[3] > 1]
    itl = [g for r in results for g in r[2]]
    tokens = sum(r[3] for r in results)
    stat = lambda xs: {"mean": float(np.mean(xs)), "median": float(np.median(xs)), "p99": float(np.percentile(xs, 99))}
    return {"requests": len(results), "duration_s": duration, "request_throughput": len(results) / duration,
            "output_tokens_per_s": tokens / duration, "output_tokens": tokens,
            "ttft_s": stat(ttft), "tpot_s": stat(tpot), "itl_s": stat(itl or [0.0])}


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, env=None, timeout=900):
    """Starts a server process and waits (bounded) for its /health."""
    import urllib.request

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd} did not become healthy in {timeout}s")


def jaxlm_serve_cmd(path: str, port: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "jaxlm", "serve", "--model", path, "--port", str(port), *options]


def stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def model_dir(workdir: str) -> str:
    """The 217M checkpoint with the real tokenizer files beside it."""
    import shutil

    path = make_checkpoint(os.path.join(workdir, "internlm2"), bench_config())
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(TOKENIZER_DIR, name), path)
    return path


def llama_dir(workdir: str, src: str) -> str:
    """The Llama twin saved for ``transformers serve``, with a Llama tokenizer on the same pieces."""
    import shutil

    dst = os.path.join(workdir, "llama")
    if not os.path.isfile(os.path.join(dst, "config.json")):
        llama_twin(src, bench_config()).save_pretrained(dst)
    if not os.path.isfile(os.path.join(dst, "tokenizer.json")):
        from transformers import LlamaTokenizer

        shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.model"), dst)
        LlamaTokenizer.from_pretrained(dst).save_pretrained(dst)   # converted from the SentencePiece model
    return dst


def texts(requests, tokenizer):
    return [(tokenizer.decode(ids), n) for ids, n in requests]


def run_static(path, requests):
    """jaxlm's static generate, one request at a time (the no-batching baseline)."""
    from jaxlm import InternLM2ForCausalLM

    model = InternLM2ForCausalLM.from_pretrained(path)
    # Compile every shape first (prompt-length and output-length buckets), untimed, as the
    # servers compile before they are healthy: the timed pass measures generation only.
    for ids, n in requests:
        model.generate(np.asarray([ids]), max_new_tokens=n, eos_token_id=None)
    results, start = [], time.perf_counter()
    for ids, n in requests:
        t = time.perf_counter()
        model.generate(np.asarray([ids]), max_new_tokens=n, eos_token_id=None)
        latency = time.perf_counter() - t
        results.append((latency, latency, [], n))   # no streaming: TTFT is the whole latency
    return summarize(results, time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jaxlm-bench-serve"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    parser.add_argument("--peers", default="jaxlm,static,transformers")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from jaxlm import InternLM2Tokenizer

    path = model_dir(args.workdir)
    tokenizer = InternLM2Tokenizer.from_pretrained(path)
    requests = dataset(args.requests, 0, bench_config().vocab_size)
    prompts = texts(requests, tokenizer)
    # The prompts go as text to both servers (transformers serve takes only strings);
    # jaxlm re-encodes them, so its token counts may differ slightly from the ids above.
    results = {}
    peers = args.peers.split(",")
    if "jaxlm" in peers:
        port = free_port()
        proc = start(jaxlm_serve_cmd(path, port, "--max-num-seqs", str(args.max_concurrency), "--max-model-len", "512",
                                     "--page-size", "32", "--num-pages", "512", "--max-num-batched-tokens", "256"), port)
        try:
            results["jaxlm serve"] = asyncio.run(run_load(f"http://127.0.0.1:{port}/v1/completions", prompts,
                                                          model=os.path.basename(path),
                                                          concurrency=args.max_concurrency, rate=args.request_rate))
        finally:
            stop(proc)
    if "transformers" in peers:
        port = free_port()
        llama = llama_dir(args.workdir, path)
        try:
            proc = start(["transformers", "serve", llama, "--continuous-batching", "--port", str(port),
                          "--host", "127.0.0.1"], port)
            try:
                results["transformers serve --continuous-batching"] = asyncio.run(run_load(
                    f"http://127.0.0.1:{port}/v1/completions", prompts, model=llama,
                    concurrency=args.max_concurrency, rate=args.request_rate, payload=transformers_payload))
            finally:
                stop(proc)
        except Exception as e:  # reported, not hidden: the table says the peer did not run
            results["transformers serve --continuous-batching"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    if "static" in peers:
        results["jaxlm generate, one at a time"] = run_static(path, requests)

    print(f"\nserving load, 217.7M params float32, {args.requests} requests, prompts 32-256, outputs 32-64, "
          f"{'rate ' + str(args.request_rate) + '/s' if args.request_rate else f'concurrency {args.max_concurrency}'}; "
          f"CPU ({machine()})")
    print(f"{'peer':<44} {'req/s':>6} {'out tok/s':>9} {'TTFT med':>9} {'TPOT med':>9} {'ITL p99':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<44} did not run: {r['error']}")
            continue
        print(f"{name:<44} {r['request_throughput']:6.2f} {r['output_tokens_per_s']:9.1f} "
              f"{r['ttft_s']['median']:8.2f}s {r['tpot_s']['median'] * 1e3:7.0f}ms {r['itl_s']['p99'] * 1e3:6.0f}ms")
    base = results.get("jaxlm serve", {}).get("output_tokens_per_s")
    for name, r in results.items():
        if base and name != "jaxlm serve" and "output_tokens_per_s" in r:
            print(f"jaxlm serve / {name}: {base / r['output_tokens_per_s']:.2f}x output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""`jaxlm serve` against a live server on 127.0.0.1, and `jaxlm.pipeline`.

One server (a subprocess, on the golden real-vocabulary checkpoint so that
the golden chat case runs through it) serves every HTTP test; a second one,
started from the first one's persistent compilation cache, checks the API
key, --served-model-name and SIGTERM. Engine settings are tiny so that
warm-up (every bucket compiled) stays short. Every request has a timeout and
every loop a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import openai
import psutil
import pytest

from jaxlm import InternLM2Tokenizer, JaxlmError, pipeline
from jaxlm.chat import DEFAULT_META_INSTRUCTION, format_tool_call, render_messages
from jaxlm.runtime.generate import chat_inputs
from jaxlm.serving.loop import AsyncEngine, EngineClosedError, QueueFullError
from jaxlm.serving.params import SamplingParams
from jaxlm.serving.protocol import chat_messages, encode_chat, parse_reply

from conftest import REPO, require_shared
from live_server import CASE, ENGINE_ARGS, MAX_MODEL_LEN, LiveServer, http_get, metrics, wait_for

MAX_QUEUE = 2
TIMEOUT = 60          # seconds, any one request


# ------------------------------------------------------------------ servers
def start_server(model_dir, log_path, cache_dir, *extra) -> LiveServer:
    """`jaxlm serve` on ``model_dir`` with this file's tiny engine settings."""
    return LiveServer(log_path, cache_dir, "--model", str(model_dir), "--log-level", "warning", *ENGINE_ARGS, *extra)


@pytest.fixture(scope="module")
def golden_dir():
    return require_shared("golden", CASE)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def server(golden_dir, cache_dir, tmp_path_factory):
    srv = start_server(golden_dir, tmp_path_factory.mktemp("logs") / "server.log", cache_dir,
                       "--max-queue", str(MAX_QUEUE))
    try:
        srv.wait_healthy()
        srv.compiles_when_ready = metrics(srv)["jaxlm_compilations_total"]
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tok(golden_dir):
    return InternLM2Tokenizer.from_pretrained(str(golden_dir))


@pytest.fixture(scope="module")
def golden_case(golden_dir):
    case = json.loads((golden_dir / "chat_case.json").read_text())
    ref = np.load(golden_dir / "golden.npz")
    messages = [{"role": "system", "content": case["meta_instruction"]}]
    for query, answer in case["history"]:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": case["query"]})
    return case, ref, messages


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def post(server, path, body, headers=None, raw: bytes | None = None):
    """(status, JSON body) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(**kw):
    return dict(temperature=0.0, **kw)


def post_together(server, bodies, field: str) -> list:
    """Sends every completion request at once; each one's first choice's ``field``, in order."""
    async def together():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            async def one(body):
                async with session.post(server.url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["choices"][0][field]
            return await asyncio.gather(*(one(b) for b in bodies))

    return asyncio.run(together())


def open_stream(server, path, body):
    """A streaming POST left open: (connection, response) to read server-sent events from."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("POST", path, json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def read_events(resp, limit=10_000):
    """Yields each event's JSON until ``[DONE]`` (bounded)."""
    for _ in range(limit):
        line = resp.readline()
        if not line:
            raise AssertionError("the stream ended without [DONE]")
        line = line.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            return
        yield json.loads(line[len("data: "):])
    raise AssertionError("too many events")


# -------------------------------------------------------------------- tests
def test_health_and_models(server):
    assert http_get(server.url + "/health")[0] == 200
    status, body = http_get(server.url + "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [CASE]       # the directory's basename


def test_openai_client_completions_streaming_and_not(client, tok):
    prompt = "Shanghai is"
    full = client.completions.create(model=CASE, prompt=prompt, max_tokens=8, temperature=0, extra_body={
        "ignore_eos": True})
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert full.usage.prompt_tokens == len(tok.encode(prompt)) and full.usage.completion_tokens == 8
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(client.completions.create(model=CASE, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert len(chunks) > 1 and chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=CASE, messages=messages, max_tokens=10, temperature=0)
    message = full.choices[0].message
    assert message.role == "assistant" and message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=CASE, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_golden_chat_case_through_chat_and_completions(server, client, golden_case):
    case, ref, messages = golden_case
    chat = client.chat.completions.create(model=CASE, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == case["generated_text_skip_special"]
    assert chat.usage.prompt_tokens == ref["prompt_ids"].shape[1]
    status, body = post(server, "/v1/completions", dict(prompt=ref["prompt_ids"][0].tolist(), max_tokens=12,
                                                        temperature=0, return_token_ids=True))
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] + choice["token_ids"] == ref["greedy_ids"][0].tolist()
    # the chat prompt is the one model.chat builds, token for token
    status, body = post(server, "/v1/chat/completions", dict(messages=messages, max_tokens=1, return_token_ids=True))
    assert body["choices"][0]["prompt_token_ids"] == ref["prompt_ids"][0].tolist()


def test_concurrent_requests_equal_their_solo_results(server, tok):
    prompts = ["Shanghai is", "The capital of France is", "1 + 1 =", "Hello", "InternLM is a"]
    bodies = [dict(prompt=p, max_tokens=10, ignore_eos=True, **greedy()) for p in prompts]
    solo = [post(server, "/v1/completions", b)[1]["choices"][0]["text"] for b in bodies]

    assert post_together(server, bodies, "text") == solo      # 5 > max_num_seqs: one waits, then joins the batch


def test_preemption_when_pages_run_out_changes_no_result(server):
    rng = np.random.default_rng(0)
    bodies = [dict(prompt=rng.integers(1000, 90000, 150).tolist(), max_tokens=90, ignore_eos=True,
                   return_token_ids=True, **greedy()) for _ in range(4)]      # 240 tokens: 4 pages each
    solo = [post(server, "/v1/completions", b)[1]["choices"][0]["token_ids"] for b in bodies]
    before = metrics(server)["jaxlm_preemptions_total"]

    assert post_together(server, bodies, "token_ids") == solo
    assert metrics(server)["jaxlm_preemptions_total"] > before


def test_n_samples_share_the_prompt_pages(server, client, golden_case):
    _, _, messages = golden_case          # 136 tokens: two full 64-token pages to share
    before = metrics(server)
    kw = dict(model=CASE, messages=messages, max_tokens=6, temperature=1.0, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]   # seeded
    assert len({c.message.content for c in a.choices}) > 1                                    # seed + i each
    after = metrics(server)
    assert after["jaxlm_prefix_cache_hits_total"] - before["jaxlm_prefix_cache_hits_total"] >= 2 * 2 * 2


def test_logprobs(server):
    status, body = post(server, "/v1/completions", dict(prompt="Shanghai is", max_tokens=4, logprobs=3,
                                                        ignore_eos=True, **greedy()))
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
    status, body = post(server, "/v1/chat/completions", dict(messages=[{"role": "user", "content": "hi"}],
                                                             max_tokens=3, logprobs=True, top_logprobs=2,
                                                             ignore_eos=True, **greedy()))
    content = body["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == 3
    assert all(len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"] for c in content)
    assert "".join(bytes(c["bytes"]).decode("utf-8", "replace") for c in content) \
        .startswith(body["choices"][0]["message"]["content"][:1])


LONG = list(range(1000, 1000 + MAX_MODEL_LEN - 6))
BAD = [
    ("/v1/completions", dict(prompt="x", temperature=-0.5), 400, "temperature"),
    ("/v1/completions", dict(prompt="x", top_p=0), 400, "top_p"),
    ("/v1/completions", dict(prompt="x", top_p=1.5), 400, "top_p"),
    ("/v1/completions", dict(prompt="x", max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", dict(prompt="x", n=0), 400, "n"),
    ("/v1/completions", dict(prompt=LONG, max_tokens=7), 400, "max_tokens"),
    ("/v1/completions", dict(prompt=LONG + [5] * 10, max_tokens=1), 400, "prompt"),
    ("/v1/completions", dict(prompt=[5, 99999999]), 400, "prompt"),
    ("/v1/completions", dict(prompt="x", logprobs=6), 400, "logprobs"),
    ("/v1/completions", dict(prompt="x", temperature="hot"), 400, "temperature"),
    ("/v1/completions", dict(max_tokens=3), 400, "prompt"),
    ("/v1/completions", dict(prompt="x", model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", dict(messages=[]), 400, "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "robot", "content": "x"}]), 400, "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=9, logprobs=True), 400,
     "top_logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], model="nope"), 404, "model"),
]


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server):
    for path, body, status, param in BAD:
        got, reply = post(server, path, body)
        assert got == status, (body, reply)
        assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
        assert reply["error"]["param"] == param, (body, reply)
    for raw in (b"{not json", b"[1, 2]", b""):
        got, reply = post(server, "/v1/chat/completions", None, raw=raw)
        assert got in (400, 422) and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert http_get(server.url + "/v1/nothing-here")[0] == 404
    # exactly at max_model_len is allowed
    status, body = post(server, "/v1/completions", dict(prompt=LONG, max_tokens=6, ignore_eos=True, **greedy()))
    assert status == 200 and body["usage"]["total_tokens"] == MAX_MODEL_LEN
    status, body = post(server, "/v1/completions", dict(prompt="still here", max_tokens=2, **greedy()))
    assert status == 200 and http_get(server.url + "/health")[0] == 200


def test_a_full_queue_answers_429_and_recovers(server):
    capacity = 4 + MAX_QUEUE        # max_num_seqs + max_queue

    async def burst():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            async def one(i):
                body = dict(prompt=f"request {i}", max_tokens=40, ignore_eos=True, **greedy())
                async with session.post(server.url + "/v1/completions", json=body) as r:
                    return r.status, await r.json()
            return await asyncio.gather(*(one(i) for i in range(capacity + 4)))

    results = asyncio.run(burst())
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) >= capacity and statuses.count(429) >= 1, statuses
    assert all(b["error"]["code"] == "rate_limit_exceeded" for s, b in results if s == 429)
    assert post(server, "/v1/completions", dict(prompt="after", max_tokens=2))[0] == 200


def test_a_disconnect_mid_stream_frees_its_pages_at_once(server):
    base = metrics(server)
    assert base["jaxlm_kv_cache_pages_used"] == 0
    conn, resp = open_stream(server, "/v1/completions", dict(prompt="a long story", max_tokens=200,
                                                             ignore_eos=True, **greedy()))
    events = read_events(resp)
    for _ in range(3):
        next(events)
    assert metrics(server)["jaxlm_kv_cache_pages_used"] >= 1 and metrics(server)["jaxlm_num_requests_running"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    aborted = 'jaxlm_requests_finished_total{finish_reason="abort"}'
    freed = wait_for(lambda: (m := metrics(server))["jaxlm_kv_cache_pages_used"] == 0
                     and m[aborted] == base[aborted] + 1 and m["jaxlm_num_requests_running"] == 0, timeout=5)
    assert freed, metrics(server)


def test_a_client_gone_before_a_non_streaming_reply_aborts_it(server):
    aborted = 'jaxlm_requests_finished_total{finish_reason="abort"}'
    base = metrics(server)[aborted]
    body = json.dumps(dict(prompt="no one will read this", max_tokens=200, ignore_eos=True, **greedy())).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_for(lambda: metrics(server)["jaxlm_num_requests_running"] == 1, timeout=10)
    gone = wait_for(lambda: (m := metrics(server))[aborted] == base + 1 and m["jaxlm_kv_cache_pages_used"] == 0,
                    timeout=5)
    assert gone, metrics(server)


def test_nothing_compiles_after_warmup(server, client, golden_case):
    """From /health's first 200 on, whatever ran before this test and the mixed workload here."""
    _, _, messages = golden_case
    bodies = [
        dict(prompt="mixed one", max_tokens=5, **greedy()),
        dict(prompt="mixed two", max_tokens=9, temperature=0.9, top_p=0.8, seed=1),
        dict(prompt="mixed three", max_tokens=4, temperature=1.2, top_k=20, repetition_penalty=1.3, logprobs=5),
        dict(prompt=list(range(7, 207)), max_tokens=3, **greedy()),          # 200 tokens: many chunks, 4 pages
        # 2 prompts x n=2: with the 4 above, over the 6 in flight the queue admits, so a second wave
        dict(prompt=["a", "b"], max_tokens=3, n=2, temperature=0.7, stop=["\n", "e"], stop_token_ids=[13]),
    ]

    async def mixed(bodies):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            async def one(body):
                async with session.post(server.url + "/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    return await r.json()
            return await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(mixed(bodies[:4]))
    (multi,) = asyncio.run(mixed(bodies[4:]))
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    list(client.chat.completions.create(model=CASE, messages=messages, max_tokens=4, stream=True, logprobs=True,
                                        top_logprobs=1))
    assert metrics(server)["jaxlm_compilations_total"] == server.compiles_when_ready


def test_tools_are_rendered_in_the_plugin_format(server, tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Shanghai?"},
                {"role": "assistant", "content": "Let me look.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Shanghai"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    rendered = chat_messages(messages, tools)
    assert rendered == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "name": "plugin", "content": json.dumps([tools[0]["function"]])},
        {"role": "user", "content": "Weather in Shanghai?"},
        {"role": "assistant", "content": "Let me look." + format_tool_call("get_weather", {"city": "Shanghai"})},
        {"role": "environment", "name": "plugin", "content": '{"temperature": 21}'},
    ]
    ids = encode_chat(tok, messages, tools)
    assert ids == tok.apply_chat_template(rendered, tokenize=True)
    text = render_messages(rendered)
    assert "<|im_start|>system name=<|plugin|>\n[{\"name\": \"get_weather\"" in text
    assert "<|action_start|><|plugin|>\n{\"name\": \"get_weather\"" in text
    assert "<|im_start|>environment name=<|plugin|>" in text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    body = dict(messages=messages, tools=tools, max_tokens=6, return_token_ids=True, **greedy())
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 200 and reply["choices"][0]["prompt_token_ids"] == ids
    # streamed with tools: the same content (random weights make no call)
    conn, resp = open_stream(server, "/v1/chat/completions", body)
    events = list(read_events(resp))
    conn.close()
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert streamed == reply["choices"][0]["message"]["content"]
    # tool_choice "none": no plugin turn
    status, body = post(server, "/v1/chat/completions", dict(messages=messages, tools=tools, tool_choice="none",
                                                             max_tokens=1, return_token_ids=True))
    assert body["choices"][0]["prompt_token_ids"] == encode_chat(tok, messages)


def test_a_plugin_call_in_the_reply_becomes_tool_calls(tok):
    reply = "I will check." + format_tool_call("get_weather", {"city": "Shanghai"}, thought="")
    ids = tok.encode(reply, add_special_tokens=False)
    content, calls = parse_reply(tok, ids, tok.decode(ids, skip_special_tokens=True))
    assert content == "I will check."
    assert [c["function"]["name"] for c in calls] == ["get_weather"] and calls[0]["type"] == "function"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Shanghai"}
    plain = tok.encode("no call here", add_special_tokens=False)
    assert parse_reply(tok, plain, "no call here") == ("no call here", None)


@pytest.mark.parametrize("args, needle, code", [
    (["--quantize", "int3"], "--quantize", 2),
    (["--max-num-seqs", "0"], "--max-num-seqs", 2),
    (["--port", "http"], "--port", 2),
])
def test_bad_command_lines_are_one_line_errors(golden_dir, args, needle, code):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "jaxlm", "serve", "--model", str(golden_dir), *args],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_api_key_served_name_and_sigterm_with_an_open_stream(server, golden_dir, cache_dir, tmp_path):
    """A second server (from the first one's compilation cache): auth, the served name, then SIGTERM."""
    srv = start_server(golden_dir, tmp_path / "server2.log", cache_dir, "--api-key", "s3cret",
                       "--served-model-name", "internlm2-test")
    try:
        srv.wait_healthy()
        assert http_get(srv.url + "/v1/models")[0] == 401
        status, body = post(srv, "/v1/completions", dict(prompt="x"), headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        key = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in key.models.list().data] == ["internlm2-test"]
        assert key.completions.create(model="internlm2-test", prompt="hi", max_tokens=2).choices[0].text is not None

        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps(dict(prompt="an open stream", max_tokens=60, stream=True,
                                                                ignore_eos=True, temperature=0)),
                     {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        resp = conn.getresponse()
        assert resp.status == 200
        events = read_events(resp)
        first = next(events)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(events)                       # the stream runs to its end
        assert len(rest) >= 10 and rest[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(e["choices"][0]["text"] for e in [first] + rest)) > 0
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
        with socket.socket() as s:                # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", srv.port))
        assert "Traceback" not in srv.logs()
    finally:
        srv.stop()


# ----------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe(golden_dir):
    # one page per request: a single block-table width, so only two programs compile (in this process)
    return pipeline(str(golden_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, page_size=MAX_MODEL_LEN,
                    num_pages=8, max_num_batched_tokens=16, max_num_seqs=4)


def test_pipeline_chat_and_raw_completion(pipe, golden_case, tok, server):
    case, ref, messages = golden_case
    chat, raw = pipe([messages, "Shanghai is"], max_tokens=12, temperature=0.0)
    assert chat.text == case["generated_text_skip_special"]
    assert chat.token_ids == ref["greedy_ids"][0, ref["prompt_ids"].shape[1]:].tolist()
    assert chat.finish_reason == "length" and chat.prompt_tokens == 136 and chat.completion_tokens == 12
    # a string is chat-templated as model.chat does it (default system prompt)
    assert raw.prompt_tokens == chat_inputs(tok, "Shanghai is", [], DEFAULT_META_INSTRUCTION)[0].shape[1]
    # chat=False: the raw completion, the same as the server's
    alone = pipe("Shanghai is", chat=False, max_tokens=8, temperature=0.0, ignore_eos=True)
    served = post(server, "/v1/completions", dict(prompt="Shanghai is", max_tokens=8, ignore_eos=True,
                                                  **greedy()))[1]
    assert alone.text == served["choices"][0]["text"] and alone.prompt_tokens == len(tok.encode("Shanghai is"))


def test_pipeline_progress_bar_and_bad_options(pipe, capsys):
    out = pipe([f"item {i}" for i in range(5)], chat=False, max_tokens=2, temperature=0.0, progress=True)
    assert [r.index for r in out] == list(range(5)) and all(r.completion_tokens <= 2 for r in out)
    assert "generating" in capsys.readouterr().err
    with pytest.raises(JaxlmError, match="unknown generation option"):
        pipe(["x"], max_new_tokenz=3)
    with pytest.raises(JaxlmError, match="unknown engine option"):
        pipeline(pipe.model, pipe.tokenizer, max_num_seq=2)
    with pytest.raises(JaxlmError, match="temperature"):
        pipe(["x"], temperature=-1.0)
    assert not pipe.engine.has_work()


# ------------------------------------------------------------- AsyncEngine
def test_async_engine_generate_cancel_queue_and_shutdown(pipe):
    """In process, on the pipeline's engine: outputs, early exit aborts, the in-flight bound, idle sleep."""
    engine = AsyncEngine(pipe.engine, max_queue=0, warmup=False).start()
    engine.wait_ready(60)
    prompt = pipe.tokenizer.encode("Shanghai is")
    want = pipe("Shanghai is", chat=False, max_tokens=6, temperature=0.0, ignore_eos=True).token_ids

    async def scenario():
        got = [t async for out in engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                                          ignore_eos=True)) for t in out.token_ids]
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        async with contextlib.aclosing(engine.generate(prompt, long)) as stream:
            async for _ in stream:
                break                                   # leaving early aborts the request
        streams = [await engine.submit([(prompt, long, None)]) for _ in range(4)]   # max_num_seqs, no queue
        with pytest.raises(QueueFullError):
            await engine.submit([(prompt, long, None)])
        for s in streams:
            s.cancel()
        return got

    assert asyncio.run(scenario()) == want
    assert wait_for(lambda: engine.stats["running"] == 0 and engine.stats["pages_used"] == 0, timeout=10)
    assert engine.finished["abort"] == 5 and not pipe.engine.has_work()
    thread = next(t for t in psutil.Process().threads() if t.id == engine._thread.native_id)
    time.sleep(0.5)
    idle = next(t for t in psutil.Process().threads() if t.id == engine._thread.native_id)
    assert idle.user_time + idle.system_time - thread.user_time - thread.system_time < 0.1   # asleep, not spinning
    assert engine.shutdown(10)
    with pytest.raises(EngineClosedError):
        asyncio.run(engine.submit([(prompt, SamplingParams(max_tokens=2), None)]))

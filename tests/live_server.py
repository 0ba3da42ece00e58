"""A live ``jaxlm serve`` (or ``jaxlm chat-web``) subprocess on 127.0.0.1 and a free port, for tests.

It logs to a file, shares a persistent compilation cache, and is stopped
with SIGTERM (then killed) by the test that started it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO

STARTUP_TIMEOUT = 300   # seconds: load, then compile every program the engine can need

CASE = "tiny_chat_realvocab"   # the golden real-vocabulary checkpoint the live servers serve
MAX_MODEL_LEN = 256
# small buckets: page 64 -> block tables of 1, 2 or 4 pages; one prefill chunk length (16): 7 programs.
# 11 usable pages: four requests of 4 pages each do not fit at once (preemption, in test_serve.py)
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--page-size", "64", "--num-pages", "12",
               "--max-num-batched-tokens", "16", "--max-num-seqs", "4"]


def wait_for(predicate, timeout=10.0, interval=0.05):
    """The predicate's first true value within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def http_get(url, headers=None, timeout=60) -> tuple[int, str]:
    """``(status, body)`` of a GET, error statuses included."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(server) -> dict[str, float]:
    """The server's Prometheus samples by name (labels included)."""
    status, text = http_get(server.url + "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([-+0-9.e]+|NaN)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``python -m jaxlm COMMAND --host 127.0.0.1 --port P *args``, logging to ``log_path``."""

    def __init__(self, log_path, cache_dir, *args, command: str = "serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.pop("XLA_FLAGS", None)   # one device, as a user's server
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxlm", command, "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def wait_healthy(self, timeout=STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        pytest.fail(f"no /health 200 within {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

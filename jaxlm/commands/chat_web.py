"""``jaxlm chat-web --model DIR``: `jaxlm serve`, and the URL of its chat page once it is warm.

Takes every ``jaxlm serve`` option. The server compiles before it answers,
so the URL is printed when ``/health`` first says 200: opening it then gives
a chat that answers at once. ``--port 0`` picks a free port here, so that
the URL can name it.
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
import time

from jaxlm.cli_util import user_errors
from jaxlm.commands import serve
from jaxlm.errors import JaxlmError

HEALTH_POLL_S = 0.5
ANNOUNCE_WITHIN_S = 6 * 3600   # a huge model may take long to load and compile; the poll still ends


def build_parser(parser):
    return serve.build_parser(parser)


def page_url(host: str, port: int) -> str:
    """The address a browser on this machine opens (a wildcard host is reached through loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise JaxlmError(f"--host: cannot listen on {host} ({e.strerror or e})") from None
        return s.getsockname()[1]


def _is_healthy(host: str, port: int) -> bool:
    # http.client rather than urllib: no proxy settings apply to a loopback check
    conn = http.client.HTTPConnection(host.strip("[]"), port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _announce_when_healthy(url_host: str, port: int, url: str, api_key: bool) -> None:
    deadline = time.monotonic() + ANNOUNCE_WITHIN_S
    while time.monotonic() < deadline:
        if _is_healthy(url_host, port):
            note = " (it asks for the --api-key once)" if api_key else ""
            print(f"jaxlm chat-web: chat page at {url}{note}", file=sys.stderr, flush=True)
            return
        time.sleep(HEALTH_POLL_S)


def run(args) -> int:
    if args.port == 0:
        with user_errors():
            args.port = _free_port(args.host)
    url = page_url(args.host, args.port)
    url_host = url.split("//", 1)[1].rsplit(":", 1)[0]
    threading.Thread(target=_announce_when_healthy, args=(url_host, args.port, url, args.api_key is not None),
                     name="chat-web-announce", daemon=True).start()
    return serve.run(args)

"""The chat page of `jaxlm serve` in a real headless Chromium (Selenium, the system chromedriver).

One live server per module, started as ``jaxlm chat-web`` (which is
``jaxlm serve`` plus the page's URL printed) with ``--api-key``, on the golden
real-vocabulary checkpoint: its random weights write gibberish, so the tests
check structure, streaming and what the server received, not the words.
The browser's console and network logs are read through chromedriver; what
the server received is read from its own ``/metrics`` counters. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
from aiohttp import web

try:   # in the test extra; without it the browser tests fail under CI=true and skip elsewhere
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

from jaxlm import InternLM2Tokenizer
from jaxlm.chat import DEFAULT_META_INSTRUCTION
from jaxlm.serving.protocol import encode_chat

from conftest import REPO, require_shared
from live_server import CASE, ENGINE_ARGS, MAX_MODEL_LEN, LiveServer, free_port, http_get, metrics, wait_for

API_KEY = "s3cret-page-key"
WAIT_S = 60           # any one reply
INSTALL_HINT = ("headless Chromium and chromedriver are needed: run `bash scripts/install_browser.sh` (as root it "
                "runs `apt-get install -y chromium chromium-driver`), or set JAXLM_CHROME and JAXLM_CHROMEDRIVER")


# ------------------------------------------------------------------ browser
def _missing(message: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _browser_paths() -> tuple[str | None, str | None]:
    chrome = os.environ.get("JAXLM_CHROME") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = os.environ.get("JAXLM_CHROMEDRIVER") or shutil.which("chromedriver")
    return tuple(path if path and os.path.isfile(path) else None for path in (chrome, driver))


@pytest.fixture(scope="module")
def browser_paths():
    chrome, driver = _browser_paths()
    if not (chrome and driver) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(REPO / "scripts" / "install_browser.sh")], timeout=900, check=False)
        chrome, driver = _browser_paths()
    if not (chrome and driver):
        _missing(f"no Chromium/chromedriver found; {INSTALL_HINT}")
    return chrome, driver


@pytest.fixture(scope="module")
def selenium_installed():
    if webdriver is None:
        _missing("selenium is not installed: python -m pip install -e '.[test]'")


# ------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def golden_dir():
    return require_shared("golden", CASE)


@pytest.fixture(scope="module")
def tok(golden_dir):
    return InternLM2Tokenizer.from_pretrained(str(golden_dir))


@pytest.fixture(scope="module")
def server(golden_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("chat_web")
    srv = LiveServer(logs / "server.log", logs / "xla_cache", "--model", str(golden_dir), "--log-level", "warning",
                     "--api-key", API_KEY, *ENGINE_ARGS, command="chat-web")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()


# -------------------------------------------------------------------- page
class Page:
    """The browser on the chat page, with the chat requests it has sent (from its network log)."""

    def __init__(self, driver, url):
        self.driver, self.url = driver, url
        self.sent: list[dict] = []

    def __call__(self, script, *args):
        return self.driver.execute_script(script, *args)

    def el(self, element_id):
        return self.driver.find_element("id", element_id)

    def until(self, predicate, what: str, timeout=WAIT_S):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: predicate(), message=f"timed out ({timeout} s) waiting for {what}")

    def load(self, url=None) -> None:
        self.driver.get(url or self.url)
        self.until(lambda: self.el("model-name").text, "the page's defaults")

    def set_field(self, element_id, value) -> None:
        # a real edit (clear, then type), as a user changes a setting
        field = self.el(element_id)
        field.clear()
        if value:
            field.send_keys(value)

    def messages(self) -> list[tuple[str, str]]:
        return [(m.get_attribute("class").split()[-1], m.find_element("css selector", ".content").text)
                for m in self.driver.find_elements("css selector", "#messages .message")]

    def record_replies(self, stop_at_first_text=False) -> None:
        """Records every text the newest reply shows (and clicks Stop when it first shows some text)."""
        self("""
            const stopAtFirstText = arguments[0];
            window.__shown = []; window.__stopped = false;
            if (window.__observer) window.__observer.disconnect();
            window.__observer = new MutationObserver(() => {
              const replies = document.querySelectorAll('#messages .message.assistant .content');
              const text = replies.length ? replies[replies.length - 1].textContent : '';
              if (text && window.__shown[window.__shown.length - 1] !== text) window.__shown.push(text);
              if (stopAtFirstText && text && !window.__stopped) {
                window.__stopped = true; document.getElementById('stop').click();
              }
            });
            window.__observer.observe(document.getElementById('messages'),
                                      {subtree: true, childList: true, characterData: true});
        """, stop_at_first_text)

    def send_with_enter(self, text) -> None:
        box = self.el("input")
        lines = text.split("\n")
        for i, line in enumerate(lines):
            box.send_keys(line)
            if i < len(lines) - 1:
                box.send_keys(Keys.SHIFT, Keys.ENTER, Keys.SHIFT)   # a new line, not a send
        assert box.get_attribute("value") == text
        box.send_keys(Keys.ENTER)

    def wait_idle(self) -> None:
        self.until(lambda: self("return window.jaxlmChat.state.controller === null") and self.el("send").is_enabled(),
                   "the reply to end")

    def chat_requests(self) -> list[dict]:
        """Bodies of every /v1/chat/completions request the browser has sent, from its network log."""
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] != "Network.requestWillBeSent":
                continue
            request = message["params"]["request"]
            if request["url"].endswith("/v1/chat/completions") and request["method"] == "POST":
                self.sent.append(json.loads(request["postData"]))
        return self.sent


class DroppingProxy:
    """A forwarding proxy in front of the server that cuts each chat stream after its first text,
    once `cut` is called: the connection drops mid-reply, as a crashed server or a lost network
    drops it. (Cut at once, the browser may drop that text with the failed stream.)"""

    def __init__(self, upstream: str):
        self.upstream, self.port = upstream, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dropping-proxy", daemon=True)
        self.thread.start()
        self._run(self._start())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_S)

    async def _start(self):
        self._cut = asyncio.Event()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def _forward(self, request):
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self.session.request(request.method, self.upstream + request.rel_url.path_qs, headers=headers,
                                        data=await request.read()) as upstream:
            if upstream.content_type != "text/event-stream":
                return web.Response(status=upstream.status, body=await upstream.read(),
                                    headers={"Content-Type": upstream.headers["Content-Type"]})
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            text_seen = False
            async for line in upstream.content:
                await response.write(line)
                text_seen |= line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line
                if text_seen and line == b"\n":   # that event is whole: cut here
                    break
            await asyncio.wait_for(self._cut.wait(), WAIT_S)
            # closed (after what was written) without the chunked body's end: a broken connection to the browser
            request.transport.close()
            return response

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self._cut.set)

    def close(self) -> None:
        async def stop():
            await self.runner.cleanup()
            await self.session.close()
        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def page(browser_paths, selenium_installed, server):   # the browser is looked for before a server starts
    """One headless Chromium on the page; the key is entered in the page's dialog, as a user would."""
    chrome, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chrome   # with the driver's path too, Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        p = Page(driver, server.url + "/")
        p.load()
        p.key_dialog_at_first = p.el("api-key-dialog").is_displayed()
        p.el("api-key-input").send_keys(API_KEY + "\n")
        p.until(lambda: not p.el("api-key-dialog").is_displayed(), "the key dialog to close")
        p.load()                                   # a reload keeps the key: asked once
        p.key_dialog_after_reload = p.el("api-key-dialog").is_displayed()
        yield p
    finally:
        driver.quit()


def new_chat(page, *, system=DEFAULT_META_INSTRUCTION, temperature="0", max_tokens="16"):
    page.el("new-chat").click()
    assert page.messages() == [] and page("return window.jaxlmChat.state.history.length") == 0
    page.set_field("system-prompt", system)
    page.set_field("temperature", temperature)
    page.set_field("max-tokens", max_tokens)


# -------------------------------------------------------------------- tests
def test_chat_web_prints_the_url_and_the_page_is_served_without_the_key(server):
    page_url = server.url + "/"
    assert wait_for(lambda: f"chat page at {page_url}" in server.logs())   # printed once /health said 200
    status, html = http_get(page_url)
    assert status == 200 and '<script src="/static/chat.js"></script>' in html
    for asset, needle in (("chat.js", "/v1/chat/completions"), ("chat.css", "#messages")):
        status, text = http_get(f"{server.url}/static/{asset}")
        assert status == 200 and needle in text
    status, body = http_get(server.url + "/chat/defaults")
    assert status == 200
    # model.chat's defaults (InternLM2's): max_new_tokens 1024 is capped at half of max_model_len 256
    assert json.loads(body) == {"system_prompt": DEFAULT_META_INSTRUCTION, "temperature": 0.8, "top_p": 0.8,
                                "max_tokens": MAX_MODEL_LEN // 2, "model": CASE, "max_model_len": MAX_MODEL_LEN,
                                "api_key_required": True}
    assert http_get(server.url + "/v1/models")[0] == 401          # the API itself still wants the key


def test_chat_web_port_0_on_an_unusable_host_is_a_one_line_error(golden_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "jaxlm", "chat-web", "--model", str(golden_dir), "--host",
                             "203.0.113.9", "--port", "0"], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=WAIT_S)
    assert result.returncode == 1 and result.stderr.startswith("error: --host: cannot listen on 203.0.113.9") \
        and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_page_asks_for_the_key_once_and_starts_from_model_chats_defaults(page):
    assert page.key_dialog_at_first and not page.key_dialog_after_reload
    assert page.el("system-prompt").get_attribute("value") == DEFAULT_META_INSTRUCTION
    assert [page.el(i).get_attribute("value") for i in ("temperature", "top-p", "max-tokens")] == \
        ["0.8", "0.8", str(MAX_MODEL_LEN // 2)]


def test_enter_sends_the_reply_streams_and_the_second_turn_sends_the_history(page, server, tok, tmp_path_factory):
    new_chat(page)
    page.record_replies()
    page.send_with_enter("Hello\nthere")
    page.wait_idle()
    (role_u, user), (role_a, reply) = page.messages()
    assert (role_u, user, role_a) == ("user", "Hello\nthere", "assistant") and reply
    shown = page("return window.__shown")
    assert len(shown) >= 2 and shown[-1] == page("return arguments[0].textContent",
                                                 page.driver.find_element("css selector", ".assistant .content"))
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:])), shown   # it grew, streamed
    stats = page.driver.find_element("css selector", ".assistant .stats").text
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token after [\d.]+ s", stats), stats
    first = page.chat_requests()[-1]
    assert first["stream"] is True and first["messages"] == [
        {"role": "system", "content": DEFAULT_META_INSTRUCTION}, {"role": "user", "content": "Hello\nthere"}]
    assert (first["temperature"], first["top_p"], first["max_tokens"]) == (0, 0.8, 16)

    before = metrics(server)["jaxlm_prompt_tokens_total"]
    page.send_with_enter("And a second question?")
    page.wait_idle()
    assert [role for role, _ in page.messages()] == ["user", "assistant"] * 2
    second = page.chat_requests()[-1]
    answer = page("return window.jaxlmChat.state.history[1].content")
    assert answer.replace("`", "") == reply.replace("`", "")      # what was shown is what was sent back
    assert second["messages"] == first["messages"] + [{"role": "assistant", "content": answer},
                                                      {"role": "user", "content": "And a second question?"}]
    # the server rendered exactly that conversation: its prompt-token counter grew by its length
    want = len(encode_chat(tok, second["messages"]))
    assert wait_for(lambda: metrics(server)["jaxlm_prompt_tokens_total"] - before == want)

    artifacts = os.environ.get("JAXLM_TEST_ARTIFACTS") or str(tmp_path_factory.mktemp("artifacts"))
    os.makedirs(artifacts, exist_ok=True)
    shot = os.path.join(artifacts, "chat_page.png")
    assert page.driver.save_screenshot(shot) and os.path.getsize(shot) > 10_000
    print(f"screenshot: {shot}")


def test_stop_aborts_a_long_reply_and_new_chat_clears_it(page, server):
    new_chat(page, system="", max_tokens="240")   # an empty system prompt: no system turn at all
    before = metrics(server)
    page.record_replies(stop_at_first_text=True)
    page.send_with_enter("Write a long story.")
    page.wait_idle()
    assert page("return window.__stopped")
    (_, _), (role, reply) = page.messages()
    assert role == "assistant" and reply
    assert page.driver.find_element("css selector", ".assistant .stats").text == "stopped"
    assert page.chat_requests()[-1]["messages"] == [{"role": "user", "content": "Write a long story."}]

    def aborted():
        now = metrics(server)
        key = 'jaxlm_requests_finished_total{finish_reason="abort"}'
        return now[key] - before[key] == 1 and now
    # Chromium closes an aborted stream's connection when it chooses: here 0.3 to 8 s after Stop
    now = wait_for(aborted, timeout=30)
    assert now, "the server saw no abort"
    assert now["jaxlm_generation_tokens_total"] - before["jaxlm_generation_tokens_total"] < 240
    assert not page.el("stop").is_enabled() and page.el("send").is_enabled()
    page.el("new-chat").click()
    assert page.messages() == [] and page("return window.jaxlmChat.state.history") == []


def test_a_400_shows_as_an_error_and_the_page_stays_usable(page):
    new_chat(page, max_tokens=str(4 * MAX_MODEL_LEN))
    page.send_with_enter("Too long a reply")
    page.wait_idle()
    [(role, text)] = page.messages()     # no reply bubble: only the error
    assert role == "error" and text.startswith("Error 400: max_tokens: ") and \
        f"exceeds max_model_len ({MAX_MODEL_LEN})" in text, text
    assert page.el("input").get_attribute("value") == "Too long a reply"   # given back, to edit and resend
    assert page("return window.jaxlmChat.state.history") == []

    page.set_field("max-tokens", "4")
    page.el("input").send_keys("\n")     # Enter resends it
    page.wait_idle()
    assert [role for role, _ in page.messages()] == ["error", "user", "assistant"]
    assert page.chat_requests()[-1]["messages"][1:] == [{"role": "user", "content": "Too long a reply"}]


def test_a_dropped_connection_shows_as_an_error_and_keeps_the_reply_so_far(page, server):
    proxy = DroppingProxy(server.url)
    try:
        page.load(proxy.url + "/")     # another origin: the key is asked again there
        page.el("api-key-input").send_keys(API_KEY + "\n")
        new_chat(page, system="", max_tokens="200")
        page.send_with_enter("Tell me a long story.")
        page.until(lambda: page.messages()[-1][1], "the first text of the reply")
        proxy.cut()
        page.wait_idle()
        shown = page.messages()
        assert len(shown) == 3, shown
        (role_u, _), (role_a, reply), (role_e, error) = shown
        assert (role_u, role_a, role_e) == ("user", "assistant", "error") and reply, shown
        assert error.startswith("Connection lost: "), error
        assert page.driver.find_element("css selector", ".assistant .stats").text == "incomplete"
        assert page("return window.jaxlmChat.state.history.map(m => m.role)") == ["user", "assistant"]
        assert page.el("send").is_enabled() and not page.el("stop").is_enabled()
        page.dropped_origin = proxy.url
    finally:
        proxy.close()
        page.load()


def test_replies_are_rendered_as_text_with_code_blocks_monospaced(page):
    crafted = ("<script>window.__injected = 1</script> <b>bold</b> <img src=x onerror='window.__injected=2'>\n"
               "Run `pip install jaxlm` then:\n```python\nprint('<i>hi</i>')\n```\nafter")
    out = page("""
        const div = document.createElement('div');
        document.body.appendChild(div);
        window.jaxlmChat.renderText(div, arguments[0]);
        const pre = div.querySelector('pre');
        const result = {text: div.textContent, html_tags: [...div.querySelectorAll('*')].map(e => e.tagName),
                        pre: pre && pre.textContent, pre_font: pre && getComputedStyle(pre).fontFamily,
                        inline: [...div.querySelectorAll('span > code')].map(e => e.textContent),
                        injected: window.__injected === undefined ? null : window.__injected};
        div.remove();
        return result;
    """, crafted)
    assert out["injected"] is None
    assert set(out["html_tags"]) <= {"SPAN", "CODE", "PRE"}, out["html_tags"]   # no SCRIPT, B, IMG, I
    assert "<script>window.__injected = 1</script> <b>bold</b>" in out["text"]
    assert out["pre"] == "print('<i>hi</i>')" and "monospace" in out["pre_font"]
    assert out["inline"] == ["pip install jaxlm"]


def test_no_errors_in_the_browser_console(page):
    """Run last: the whole module's console."""
    def expected(entry):   # the network log of the 400 and of the dropped stream, provoked above
        return entry["source"] == "network" and "/v1/chat/completions" in entry["message"] and (
            "status of 400" in entry["message"] or entry["message"].startswith(getattr(page, "dropped_origin", "-")))

    unexpected = [e for e in page.driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING") and not expected(e)]
    assert unexpected == [], unexpected

"""The web UI in headless Chromium, driven over the DevTools protocol (JSON over a websocket) against a real
server: type a message, watch the answer stream in, press Stop; answers equal the engine's; history, settings,
API key, tool-call blocks, New chat, and a phone-sized screen. Skips without Debian's /usr/bin/chromium."""
import itertools
import json
import os
import re
import subprocess
import time

import httpx
import pytest

from conftest import scripted_sampler, serve_in_thread, slow_steps
from fastchat_core.engine import SamplingParams
from fastchat_core.tokenizer import assistant_parts

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"needs Debian's Chromium at {CHROMIUM}: apt-get install -y chromium"),
              pytest.mark.usefixtures("one_thread")]
websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs the websockets package (test extra)")
KEY = "sekrit"


def launch_chromium(profile):
    """Start headless Chromium; returns (process, the DevTools websocket URL of its tab)."""
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file, deadline = profile / "DevToolsActivePort", time.time() + 60   # Chromium writes its port here
    while not (port_file.exists() and port_file.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "Chromium did not start"
        time.sleep(0.05)
    port = port_file.read_text().split()[0]
    tab = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
    return proc, tab["webSocketDebuggerUrl"]


class Page:
    """One Chromium tab, spoken to over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    def call(self, method, **params):
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:   # skip the events (none are enabled, but be safe) until our answer
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == call_id:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression, timeout=15.0):
        deadline = time.time() + timeout
        while not (value := self.js(expression)):
            assert time.time() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.03)
        return value

    def open(self, url):
        self.call("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('input')")

    def click(self, selector):
        """A real mouse click at the element's centre."""
        x, y = self.js(f"(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, text, submit=True):
        self.click("#input")
        self.call("Input.insertText", text=text)
        if submit:
            for kind in ("keyDown", "keyUp"):
                self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def settings(self, **values):
        """Fill the settings panel the way a user does (the page saves them on change)."""
        for name, value in values.items():
            self.js(f"(() => {{ const el = document.getElementById('{name}'); el.value = {json.dumps(str(value))};"
                    " el.dispatchEvent(new Event('change')); })()")


@pytest.fixture(scope="module")
def ui(checkpoint, tmp_path_factory):
    """(page, server url, the server's engine) with an API key set on the server."""
    with serve_in_thread(checkpoint, "--api-key", KEY) as (url, engine):
        proc, ws_url = launch_chromium(tmp_path_factory.mktemp("chromium"))
        try:
            with websockets_sync.connect(ws_url, max_size=None) as ws:
                yield Page(ws), url, engine
        finally:
            proc.terminate()
            proc.wait(10)


def messages(page):
    return json.loads(page.js("JSON.stringify(messages)"))


def shown(text):
    """What a bubble displays for an answer: a tool span's markers go (it becomes a styled block), its text stays;
    a stray marker outside a span is shown as it is."""
    return re.sub(r"<\|(python|output)_start\|>(.*?)(?:<\|\1_end\|>|\Z)", r"\2", text, flags=re.S)


def test_answer_streams_in_and_stop_aborts_it(ui, reference):
    page, url, engine = ui
    _, tok = reference
    word = tok.encode(" la")
    script = scripted_sampler(word, cycle=True)   # the model never ends on its own: only Stop can end this answer
    engine._sample = lambda seqs, logits: script(engine, seqs, logits)
    aborted = engine.metrics()["aborted"]
    try:
        with slow_steps(engine, 0.02):
            page.open(url)
            page.settings(api_key=KEY, temperature=1, max_tokens=200)
            page.type("Sing me a song")
            page.wait("document.querySelector('.msg.user')?.textContent === 'Sing me a song'")
            lengths = []
            while len(set(lengths)) < 3:   # the answer grows while the stream is open
                assert page.js("!document.getElementById('stop').hidden"), "the answer ended before Stop"
                lengths.append(page.js("document.querySelector('.msg.assistant').textContent.length"))
                time.sleep(0.05)
            assert lengths == sorted(lengths) and lengths[-1] > 0
            page.click("#stop")
            page.wait("document.getElementById('stop').hidden && !document.querySelector('.streaming')")
            text = page.js("document.querySelector('.msg.assistant').textContent")
            time.sleep(0.3)
            assert page.js("document.querySelector('.msg.assistant').textContent") == text   # no more tokens
    finally:
        del engine._sample
    assert text and (" la" * 200).startswith(text)
    # Stop closed the connection: the server aborted the request and freed its KV blocks
    deadline = time.time() + 5
    while engine.requests or engine.block_manager.num_used_blocks:
        assert time.time() < deadline, "the stopped request is still in the engine"
        time.sleep(0.02)
    assert engine.metrics()["aborted"] == aborted + 1
    assert messages(page) == [{"role": "user", "content": "Sing me a song"}, {"role": "assistant", "content": text}]
    assert not page.js("document.getElementById('send').hidden")


def test_answers_follow_settings_and_history_and_new_chat_clears(ui, reference):
    page, url, _ = ui
    engine, tok = reference
    page.open(url)
    page.wait("document.getElementById('model').textContent === 'sft-d1'")   # /v1/models, with the key
    page.settings(api_key=KEY, temperature=0, max_tokens=12)   # greedy: the answer is the engine's exactly
    greedy = SamplingParams(max_tokens=12, temperature=0)
    history = [{"role": "user", "content": "Hello there"}]
    for question in ("Hello there", "And then?"):
        if question != history[-1]["content"]:
            history.append({"role": "user", "content": question})
        want = engine.generate([tok.render_for_completion(history)], greedy)[0].text
        page.type(question)
        page.wait(f"messages.length === {len(history) + 1} && document.getElementById('stop').hidden")
        assert messages(page)[-1] == {"role": "assistant", "content": want}
        assert page.js("[...document.querySelectorAll('.msg.assistant')].at(-1).textContent") == shown(want)
        history.append({"role": "assistant", "content": assistant_parts(want)})
    assert page.js("document.querySelectorAll('.msg').length") == 4
    page.click("#new")
    assert messages(page) == [] and page.js("document.querySelectorAll('.msg').length") == 0
    assert page.js("document.getElementById('empty').textContent") == "Ask anything."
    # a wrong key: the server's message shows, and the turn is not kept
    page.settings(api_key="wrong")
    page.type("Hi")
    error = page.wait("document.querySelector('.msg.error')?.textContent")
    assert "API key" in error and messages(page) == []


def test_tool_calls_render_as_blocks(ui, reference):
    page, url, engine = ui
    _, tok = reference
    sp = tok.encode_special
    script = scripted_sampler([sp("<|python_start|>"), *tok.encode("2+3"), sp("<|python_end|>"),
                               *tok.encode(" so five"), sp("<|assistant_end|>")])
    engine._sample = lambda seqs, logits: script(engine, seqs, logits)
    try:
        page.open(url)
        page.settings(api_key=KEY, max_tokens=40)
        page.type("What is 2+3?")
        page.wait("messages.length === 2")
    finally:
        del engine._sample
    assert page.js("document.querySelector('.msg.assistant .tool-call').textContent") == "2+3"
    assert page.js("document.querySelector('.msg.assistant .tool-output').textContent") == "5"
    assert page.js("document.querySelector('.msg.assistant').textContent") == "2+35 so five"
    call, out = (page.js(f"getComputedStyle(document.querySelector('.{c}')).backgroundColor")
                 for c in ("tool-call", "tool-output"))
    bubble = page.js("getComputedStyle(document.querySelector('.msg.assistant')).backgroundColor")
    assert len({call, out, bubble}) == 3   # styled apart from the prose and from each other


def test_fits_a_phone_screen(ui):
    page, url, _ = ui
    page.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=3, mobile=True)
    try:
        page.open(url)
        page.settings(api_key=KEY, max_tokens=5)
        page.type("A long line " * 30)
        page.wait("messages.length === 2")
        assert page.js("document.documentElement.scrollWidth <= window.innerWidth")   # no sideways scrolling
        send = page.js("(() => { const r = document.getElementById('send').getBoundingClientRect();"
                       " return [r.left, r.right, r.bottom]; })()")
        assert send[0] >= 0 and send[1] <= 390 and send[2] <= 844   # the send button is on screen
        assert page.js("parseFloat(getComputedStyle(document.getElementById('input')).fontSize)") >= 16   # no zoom
    finally:
        page.call("Emulation.clearDeviceMetricsOverride")

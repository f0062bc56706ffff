"""The chat server against broken and hostile clients, over real HTTP on 127.0.0.1: every malformed body (named
cases, then several hundred fuzzed ones) gets a 4xx with OpenAI's error object and never a 5xx; a prompt too long
by its length alone is refused before tokenization; a body over --max-body-bytes gets 413 without being read to
its end; megabyte requests leave other clients' streams and /health responsive; SIGTERM lets a stream finish and
the process exit 0."""
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import serve_in_thread

CONTEXT = 256   # seq_len 64: the rotary table (4x) bounds prompt + answer
LIMIT = 1 << 20   # --max-body-bytes of the module's server (the default, 4 MiB, is the subprocess's)
ROUTES = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
JSON = {"Content-Type": "application/json"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_in_thread(checkpoint, "--max-num-seqs", "16", "--max-queue", "1024",
                         "--max-body-bytes", str(LIMIT)) as s:
        yield s


def send(url, route, body, content_type="application/json"):
    """POST a dict (as JSON with \\u escapes, so "\\ud800" goes out as an escape) or a raw str / bytes body;
    content_type None sends no Content-Type header."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    headers = {} if content_type is None else {"Content-Type": content_type}
    return httpx.post(f"{url}{ROUTES[route]}", content=body, headers=headers, timeout=30)


def raw_post(url, path, body: bytes, length=None) -> tuple[int, dict]:
    """POST over a plain socket, declaring `length` bytes (default: the body's), and read until the server closes
    the connection: (status, the JSON body). Lighter on the test's CPU and GIL than an HTTP client."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(1 << 16):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def error_of(r, status) -> dict:
    """The error object of a 4xx, after checking its shape: OpenAI's four fields, a short message."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 600, error
    assert isinstance(error["type"], str) and (error["param"] is None or isinstance(error["param"], str))
    return error


def chat(content="hi", **kw):
    return {"model": "sft-d1", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": content}], "max_tokens": 2, **kw}


def nested(depth):
    return "[" * depth + "]" * depth


def raw_chat(content_json: str) -> str:
    """A chat body as text, its user content given as raw JSON text."""
    return '{"messages": [{"role": "user", "content": ' + content_json + '}], "max_tokens": 2}'


def with_raw(body: dict, key, literal: str) -> str:
    """`body` as JSON text with one more field whose value is a raw literal (1e999, NaN, ...); a key already in
    the body is overridden (the last one wins)."""
    return json.dumps(body)[:-1] + f', "{key}": {literal}}}'


S = "\ud800"   # a lone surrogate: json.dumps sends it as the escape "\ud800"
CASES = [   # (route, body, Content-Type, status, param, code, what the message must mention)
    ("chat", "[" * 100_000, "application/json", 400, None, "invalid_json", "deeper than"),
    ("chat", '{"a": ' * 100_000, "application/json", 400, None, "invalid_json", "deeper than"),
    ("chat", raw_chat(nested(100_000)), "application/json", 400, None, "invalid_json", "deeper than"),
    ("chat", raw_chat(nested(500)), "application/json", 400, "messages[0].content", None, "list [[[[[[[...]]]]]]]"),
    ("chat", chat(f"a{S}b"), "application/json", 400, "messages[1].content", None, "lone surrogate"),
    ("chat", chat("\udfff"), "application/json", 400, "messages[1].content", None, "index 0"),
    ("chat", chat([{"type": "text", "text": "ok"}, {"type": "text", "text": S}]), "application/json", 400,
     "messages[1].content", None, "lone surrogate"),
    ("chat", {"messages": [{"role": S, "content": "hi"}]}, "application/json", 400, "messages[0].role", None,
     "\\ud800"),
    ("chat", chat(model=S), "application/json", 400, "model", None, "lone surrogate"),
    ("chat", chat(stop=["ok", S]), "application/json", 400, "stop", None, "lone surrogate"),
    ("completions", {"prompt": "a" + S, "max_tokens": 2}, "application/json", 400, "prompt", None, "surrogate"),
    ("chat", raw_chat('"\\ud83d\\ude00"'), "application/json", 200, None, None, None),   # a surrogate pair: fine
    ("chat", raw_chat('"a').encode() + b'\xed\xa0\x80"}]}', "application/json", 400, None, "invalid_json",
     "can't decode byte 0xed"),   # a surrogate encoded as UTF-8 bytes
    ("chat", raw_chat('"caf\xe9"').encode("latin-1"), "application/json", 400, None, "invalid_json",
     "can't decode byte 0xe9"),
    ("chat", json.dumps(chat()).encode("utf-16"), "application/json", 400, None, "invalid_json",
     "can't decode byte 0xff"),   # json.loads(bytes) alone would take UTF-16
    ("chat", b"", "application/json", 400, None, "invalid_json", "not valid JSON"),
    ("chat", b"\xff\xfe\x00garbage", "application/json", 400, None, "invalid_json", "not valid JSON"),
    ("chat", "[]", "application/json", 400, None, "invalid_json", "JSON object"),
    ("chat", '"hello"', "application/json", 400, None, "invalid_json", "JSON object"),
    ("chat", "null", "application/json", 400, None, "invalid_json", "JSON object"),
    ("completions", '{"prompt": "hi", "max_tokens": NaN}', "application/json", 400, None, "invalid_json", "NaN"),
    ("chat", '{"messages": [], "temperature": -Infinity}', "application/json", 400, None, "invalid_json",
     "-Infinity"),
    ("chat", with_raw(chat(), "top_p", "Infinity"), "application/json", 400, None, "invalid_json", "Infinity"),
    ("chat", with_raw(chat(), "seed", "1" + "0" * 5000), "application/json", 400, None, "invalid_json", "digits"),
    ("chat", with_raw(chat(), "max_tokens", "1" + "0" * 4000), "application/json", 400, "max_tokens",
     "context_length_exceeded", "'max_tokens' is 1000"),   # parses (Python takes 4300 digits): quoted cut short
    ("chat", with_raw(chat(), "max_tokens", "1e999"), "application/json", 400, "max_tokens", None, "integer"),
    ("chat", with_raw(chat(), "temperature", "1e999"), "application/json", 400, "temperature", None, "got inf"),
    ("chat", with_raw(chat(), "top_p", "-1E400"), "application/json", 400, "top_p", None, "got -inf"),
    ("chat", chat(n=-10**30), "application/json", 400, "n", None, "between 1 and 16"),
    ("chat", chat(seed=-1), "application/json", 400, "seed", None, "between 0"),
    ("chat", chat(n=True), "application/json", 400, "n", None, "integer"),
    ("chat", chat(temperature=[1]), "application/json", 400, "temperature", None, "number"),
    ("chat", chat(stop={"a": 1}), "application/json", 400, "stop", None, "dict"),
    ("chat", chat(stream_options={"include_usage": "yes"}), "application/json", 400,
     "stream_options.include_usage", None, "true or false"),
    ("chat", chat(model=["x"]), "application/json", 400, "model", None, "string"),
    ("chat", {"messages": None}, "application/json", 400, "messages", None, "null"),
    ("chat", {"messages": [None]}, "application/json", 400, "messages[0]", None, "null"),
    ("chat", {"messages": [{"role": None, "content": "hi"}]}, "application/json", 400, "messages[0].role", None,
     "None"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "application/json", 400, "messages[0].content",
     None, "null"),
    ("chat", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "application/json", 400,
     "messages[0].content", None, "dict"),
    ("chat", {"messages": [{"role": "x" * (1 << 19), "content": "hi"}]}, "application/json", 400,
     "messages[0].role", None, "xxx...xxx"),   # half a MiB of role, quoted in a few characters
    ("completions", {"prompt": None}, "application/json", 400, "prompt", None, "null"),
    ("completions", {"prompt": {"text": "hi"}}, "application/json", 400, "prompt", None, "dict"),
    ("completions", {"prompt": "x" * 400_000, "max_tokens": 2}, "application/json", 400, "prompt",
     "context_length_exceeded", "at least"),   # refused by its length, before tokenization
    ("chat", chat(), "text/plain", 415, None, "unsupported_media_type", "Content-Type: application/json"),
    ("chat", chat(), "application/x-www-form-urlencoded", 415, None, "unsupported_media_type", "x-www-form"),
    ("completions", {"prompt": "hi"}, "multipart/form-data; boundary=x", 415, None, "unsupported_media_type",
     "multipart"),
    ("chat", chat(), "application/json; charset=utf-8", 200, None, None, None),
    ("chat", chat(), None, 200, None, None, None),   # no Content-Type: taken as JSON
]


@pytest.mark.parametrize("route,body,content_type,status,param,code,mention", CASES,
                         ids=[f"{i}-{c[3]}-{c[4] or c[5]}" for i, c in enumerate(CASES)])
def test_malformed_requests_get_a_4xx_error_object(server, route, body, content_type, status, param, code, mention):
    url, _ = server
    r = send(url, route, body, content_type)
    if status == 200:
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text
        return
    error = error_of(r, status)
    assert error["param"] == param and mention in error["message"], error
    if code is not None:
        assert error["code"] == code, error


def test_prompts_are_measured_before_tokenization_only_when_they_cannot_fit(server, tok):
    """A prompt whose length alone proves it too long is refused untokenized ("at least"); one near that bound is
    tokenized, and either runs or gets its exact token count."""
    url, _ = server
    longest = int(tok.token_bytes().max())
    word = next(s for s in (tok.decode([i]) for i in range(tok.vocab_size))
                if len(s.encode()) == longest and s[0] == " " and s[1:].isalpha() and len(tok.encode(s * 3)) == 3)
    fits = word * (CONTEXT - 10)   # just under the bound: CONTEXT - 10 tokens of `longest` characters
    assert len(fits) == (CONTEXT - 10) * longest and len(tok.encode(fits)) == CONTEXT - 10
    r = send(url, "completions", {"prompt": fits, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == CONTEXT - 9, r.text
    many = " x" * ((CONTEXT - 1) * longest // 2)   # passes the bound by its length, yet is many short tokens
    tokens = len(tok.encode(many, prepend=tok.bos_id))
    assert -(-len(many) // longest) < CONTEXT < tokens
    error = error_of(send(url, "completions", {"prompt": many}), 400)
    assert f"the prompt is {tokens} tokens" in error["message"], error
    error = error_of(send(url, "chat", chat(word * CONTEXT)), 400)   # counted: the system's text and the user's
    at_least = -(-len("Be brief." + word * CONTEXT) // longest)
    assert error["code"] == "context_length_exceeded" and f"at least {at_least} tokens" in error["message"], error


# ---- fuzzing ------------------------------------------------------------------------------------------------

POOL = [None, True, False, 0, -1, 7, 2**63, -10**30, 0.5, -0.0, 1e308, "", "x", "user", "\ud800", "\udfff",
        [], {}, [None], ["a", 1], {"type": "text"}, [{"type": "text", "text": 3}], {"a": {"b": [{}]}}]
RAW = ["1e999", "-1e999", "1" + "0" * 5000, "-" + "9" * 4000, "NaN", "Infinity", "-Infinity", "1E-400", "-0",
       nested(5000), nested(100_000), '{"a": ' * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\udc00x\\ud800"', "tru"]
CONTENT_TYPES = [None, "text/plain", "application/json; charset=utf-8", "application/x-www-form-urlencoded",
                 "application/jsonx", "multipart/form-data; boundary=z"]


def paths(value, path=()):
    """Every path into a JSON value, the value itself first."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths(child, (*path, key))


def mutate(body, rng: random.Random) -> tuple[bytes, str | None]:
    """A malformed (or, at times, still valid) variant of `body`: one to three type swaps, deletions,
    surrogate insertions, raw number or nesting literals, byte corruption, truncation, random bytes or an
    odd top-level value; and now and then a wrong or missing Content-Type."""
    body = json.loads(json.dumps(body))
    raw = None   # a literal spliced into the serialized text
    for _ in range(rng.randint(1, 3)):
        inside = list(paths(body))[1:]
        if not inside:
            break
        path, parent = rng.choice(inside), body
        for key in path[:-1]:
            parent = parent[key]
        kind = rng.choice(["swap", "swap", "delete", "surrogate", "raw"])
        if kind == "swap":
            parent[path[-1]] = rng.choice(POOL)
        elif kind == "delete":
            del parent[path[-1]]
        elif kind == "surrogate" and isinstance(parent[path[-1]], str):
            s, at = parent[path[-1]], rng.randint(0, len(parent[path[-1]]))
            parent[path[-1]] = s[:at] + rng.choice("\ud800\udbff\udc00\udfff") + s[at:]
        elif kind == "raw":
            parent[path[-1]], raw = "\x00RAW\x00", rng.choice(RAW)
            break   # the marker must survive the next mutations
    text = json.dumps(body, ensure_ascii=rng.random() < 0.7)   # surrogates as escapes, or as raw (bad) bytes
    if raw is not None:
        text = text.replace('"\\u0000RAW\\u0000"', raw)
    data = text.encode("utf-8", "surrogatepass")
    kind = rng.choice(["json"] * 6 + ["corrupt", "truncate", "random", "top"])
    if kind == "corrupt":
        data = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "random":
        data = rng.randbytes(rng.randrange(300))
    elif kind == "top":
        data = rng.choice([b"[]", b'"messages"', b"null", b"42", b"true", b"[" + data + b"]", b" "])
    content_type = rng.choice(CONTENT_TYPES) if rng.random() < 0.15 else "application/json"
    return data, content_type


def long_prompt(tok, chat: bool, room=6) -> str:
    """Text whose prompt leaves `room` tokens of context: whatever a fuzzed request asks, it generates little."""
    words = []
    while True:
        words.append(f"w{len(words) % 10}")
        text = " ".join(words)
        n = (len(tok.render_for_completion([{"role": "user", "content": text}])) if chat
             else len(tok.encode(text, prepend=tok.bos_id)))
        if n >= CONTEXT - room:
            return text


def test_fuzzed_requests_never_get_a_5xx(server, tok):
    url, engine = server
    chat_text, prompt_text = long_prompt(tok, chat=True), long_prompt(tok, chat=False)
    rng = random.Random(0)
    cases = []
    for stream in (False, True):
        bases = {"chat": {"model": "sft-d1", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": chat_text}]},
                 "completions": {"model": "sft-d1", "prompt": prompt_text}}
        for route, base in bases.items():
            base.update(max_tokens=3, temperature=0.8, top_p=0.9, top_k=20, seed=1, n=2, stop=["\n\n"],
                        stream=stream, stream_options={"include_usage": True})
            cases += [(route, *mutate(base, rng)) for _ in range(100)]

    async def one(client, limit, route, data, content_type):
        async with limit:
            headers = {} if content_type is None else {"Content-Type": content_type}
            r = await client.post(f"{url}{ROUTES[route]}", content=data, headers=headers)
            return r, route, data

    async def main():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            return await asyncio.gather(*(one(client, limit, *case) for case in cases))

    statuses = Counter()
    for r, route, data in asyncio.run(main()):
        statuses[r.status_code] += 1
        where = f"{route} {data[:300]!r}"
        assert r.status_code < 500, f"{r.status_code} for {where}: {r.text[:300]}"
        if r.status_code != 200:
            error_of(r, r.status_code)
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), where
        else:
            assert len(r.json()["choices"]) >= 1, where
    assert len(cases) == 400 and statuses[200] >= 20 and statuses[400] >= 200 and statuses[415] >= 10, statuses
    r = httpx.post(f"{url}/v1/chat/completions", json=chat("Still there?", max_tokens=5), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    deadline = time.time() + 5
    while engine.block_manager.num_used_blocks:   # nothing the fuzz did left KV blocks held
        assert time.time() < deadline, "KV blocks leaked"
        time.sleep(0.02)


# ---- body size limit ----------------------------------------------------------------------------------------

def test_body_limit_413_stops_reading(server):
    url, _ = server
    at_limit = json.dumps(chat("x" * LIMIT))[:LIMIT - 4] + '"}]}'   # exactly LIMIT bytes: read and validated
    assert len(at_limit) == LIMIT
    error_of(send(url, "chat", at_limit), 400)
    error = error_of(send(url, "chat", at_limit + " "), 413)
    assert error["code"] == "request_too_large" and "--max-body-bytes" in error["message"]

    # 64 MiB, chunked (no Content-Length): the 413 comes back and the server closes the connection instead of
    # reading on, so the client gets to send little more than the limit and what the sockets buffer
    sent = 0

    def upload():
        nonlocal sent
        chunk = b"x" * (1 << 20)
        for _ in range(64):
            sent += len(chunk)
            yield chunk

    r = httpx.post(f"{url}/v1/chat/completions", content=upload(), headers=JSON, timeout=30)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert error_of(r, 413)["code"] == "request_too_large" and r.headers["connection"] == "close"
    assert sent < 32 << 20, f"the client sent {sent >> 20} MiB: the server read past its limit"

    # a Content-Length over the limit is refused at once, before a byte of the body is sent
    status, answer = raw_post(url, "/v1/completions", b"", length=10**12)
    assert status == 413 and answer["error"]["code"] == "request_too_large"

    r = httpx.post(f"{url}/v1/chat/completions", json=chat(max_tokens=3), timeout=30)
    assert r.status_code == 200


# ---- the event loop, and shutdown, in a server process of its own --------------------------------------------

@contextlib.contextmanager
def serve_process(checkpoint, log, *argv):
    """`python -m fastchat_core.serve` on a free port of 127.0.0.1: yields (url, the process)."""
    cmd = [sys.executable, "-m", "fastchat_core.serve", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--port", "0", *argv]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not (m := re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.05)
        yield m[1], proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_megabyte_requests_do_not_stall_streams_or_health(checkpoint, tmp_path):
    """8 requests of nearly the default 4 MiB limit, prompts far too long for the model, sent at once: another
    client's stream keeps its inter-token gaps, and /health its latency, under 100 ms."""
    from fastchat_core.serve.schemas import MAX_BODY_BYTES
    big = json.dumps({"messages": [{"role": "user", "content": "word " * (MAX_BODY_BYTES // 5 - 20)}]}).encode()
    assert MAX_BODY_BYTES - 200 < len(big) <= MAX_BODY_BYTES
    story = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 200, "ignore_eos": True,
             "stream": True}
    with serve_process(checkpoint, tmp_path / "server.log") as (url, _), \
            httpx.Client(timeout=30) as streamer, httpx.Client(timeout=30) as pinger:
        gaps, pings, answers, done = [], [], [], threading.Event()

        def stream():
            with streamer.stream("POST", f"{url}/v1/chat/completions", json=story) as r:
                last = None
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

        def stream_until_done():
            while not done.is_set():
                stream()

        def ping():
            while not done.is_set():
                start = time.perf_counter()
                status = pinger.get(f"{url}/health").status_code
                pings.append((time.perf_counter() - start, status))
                time.sleep(0.01)

        def upload():
            answers.append(raw_post(url, "/v1/chat/completions", big))

        stream()   # warm-up, not measured
        gaps.clear()
        background = [threading.Thread(target=stream_until_done), threading.Thread(target=ping)]
        uploads = [threading.Thread(target=upload) for _ in range(8)]
        for t in background:
            t.start()
        deadline = time.time() + 30
        while len(gaps) < 5:
            assert time.time() < deadline, "the stream did not start"
            time.sleep(0.005)
        start = time.perf_counter()
        for t in uploads:
            t.start()
        for t in uploads:
            t.join()
        took = time.perf_counter() - start
        time.sleep(0.2)   # the stream and the pings go on a little after the last upload
        done.set()
        for t in background:
            t.join()
    assert [(status, answer["error"]["code"]) for status, answer in answers] == [(400, "context_length_exceeded")] * 8
    assert len(gaps) > 50 and len(pings) >= 5, (len(gaps), len(pings))
    assert {status for _, status in pings} == {200}
    worst_gap, worst_ping = max(gaps), max(pings)[0]
    assert worst_gap < 0.1 and worst_ping < 0.1, (f"8 x {len(big) >> 10} KiB answered in {took:.2f} s; worst gap "
                                                  f"{worst_gap * 1e3:.0f} ms, worst /health {worst_ping * 1e3:.0f} ms")


def accepting(url) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=5)
    except httpx.ConnectError:
        return False
    return True


def test_sigterm_finishes_the_stream_and_exits_0(checkpoint, tmp_path):
    log = tmp_path / "server.log"
    with serve_process(checkpoint, log, "--max-num-seqs", "1") as (url, proc):
        # 2 choices one after the other (one sequence at a time): about a second of generating after the signal
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 240, "n": 2,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            head = [next(lines) for _ in range(3)]   # the role chunk, its blank line, the first token
            proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 10
            while accepting(url):   # it stops accepting at once ...
                assert time.time() < deadline, "still accepting connections after SIGTERM"
                time.sleep(0.05)
            events = [line[6:] for line in head + list(lines) if line.startswith("data: ")]   # ... and finishes
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]}
    assert finished == {0: "length", 1: "length"} and chunks[-1]["usage"]["completion_tokens"] == 480
    text = log.read_text()
    assert "Waiting for connections to close" in text and "Application shutdown complete" in text

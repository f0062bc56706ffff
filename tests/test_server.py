"""The chat server over real HTTP (uvicorn on 127.0.0.1) and the terminal chat, on a tiny random GPT saved with
save_checkpoint and a tiny trained tokenizer: answers equal the engine's own for the same seed, 64 concurrent
streams, disconnects free KV blocks, bad input gets 4xx, a full queue 429, a missing key 401, SIGTERM drains."""
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import scripted_sampler, serve_in_thread, slow_steps
from fastchat_core import chat_cli, cli
from fastchat_core.checkpoint import CheckpointError
from fastchat_core.engine import SamplingParams, default_checkpoint
from fastchat_core.tokenizer import assistant_parts

CONTEXT = 256   # seq_len 64: the rotary table (4x) bounds prompt + answer
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve_in_thread(checkpoint, "--max-num-seqs", "16", "--max-queue", "64") as s:
        yield s


def chat_body(content, **kw):
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}], **kw}


def sse(lines) -> tuple[list[dict], bool]:
    """Parse an SSE body: the JSON chunks, and whether it ended with [DONE]."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done


def streamed_text(chunks, index=0, chat=True):
    key = (lambda c: c["delta"].get("content", "")) if chat else (lambda c: c["text"])
    return "".join(key(c) for ch in chunks for c in ch["choices"] if c["index"] == index)


def finish_reasons(chunks):
    return {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]}


def metrics(url) -> dict:
    """/metrics parsed: sample name with labels -> value."""
    text = httpx.get(f"{url}/metrics").text
    return {name: float(value) for name, value in re.findall(r"^([^#\s]\S*) (\S+)$", text, re.M)}


def wait_until(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_answers_equal_the_engine_for_the_same_seed(server, reference):
    url, _ = server
    engine, tok = reference
    body = chat_body("What is the capital of France?", max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    prompt = tok.render_for_completion(body["messages"])
    direct = engine.generate([prompt] * 2, [SamplingParams(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95,
                                                           seed=s) for s in (7, 8)])

    r = httpx.post(f"{url}/v1/chat/completions", json=body | {"n": 2}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "sft-d1"
    for choice, d in zip(out["choices"], direct):
        assert choice["message"] == {"role": "assistant", "content": d.text}
        assert choice["finish_reason"] == d.finish_reason
    assert out["usage"]["prompt_tokens"] == len(prompt)
    assert out["usage"]["completion_tokens"] == sum(len(d.token_ids) for d in direct)
    assert out["usage"]["total_tokens"] == len(prompt) + out["usage"]["completion_tokens"]

    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                      json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = sse(r.iter_lines())
    assert done and all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) > 3   # token by token, not one blob
    assert streamed_text(chunks) == direct[0].text and finish_reasons(chunks) == {0: direct[0].finish_reason}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(direct[0].token_ids)

    # a stop string taken from the answer: the text ends right before it
    full = direct[0].text
    stop = full[5:8]
    r = httpx.post(f"{url}/v1/chat/completions", json=body | {"stop": [stop, "\x00never"]}, timeout=30)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == full[:full.index(stop)]

    # text completion: the raw prompt after <|bos|>, no chat template
    text_ids = tok.encode("Once upon a time", prepend=tok.bos_id)
    want = engine.generate([text_ids], SamplingParams(max_tokens=12, temperature=0.8, seed=3))[0]
    req = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8, "seed": 3}
    out = httpx.post(f"{url}/v1/completions", json=req, timeout=30).json()
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == want.text
    assert out["usage"]["prompt_tokens"] == len(text_ids)
    with httpx.stream("POST", f"{url}/v1/completions", json=req | {"stream": True}, timeout=30) as r:
        chunks, done = sse(r.iter_lines())
    assert done and streamed_text(chunks, chat=False) == want.text

    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "sft-d1" and models["data"][0]["max_model_len"] == CONTEXT
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_64_concurrent_streams_all_complete(server, reference):
    url, server_engine = server   # 16 sequences at a time, the rest queue
    engine, tok = reference
    questions = [f"Question number {i}: why is the sky blue?" for i in range(64)]
    prompts = [tok.render_for_completion([{"role": "user", "content": q}]) for q in questions]
    direct = engine.generate(prompts, [SamplingParams(max_tokens=8, temperature=1.0, seed=i) for i in range(64)])

    async def one(client, i):
        body = {"messages": [{"role": "user", "content": questions[i]}], "max_tokens": 8, "seed": i, "stream": True}
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            return sse([line async for line in r.aiter_lines()])

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(done for _, done in results)
    assert [streamed_text(chunks) for chunks, _ in results] == [d.text for d in direct]
    assert [finish_reasons(chunks)[0] for chunks, _ in results] == [d.finish_reason for d in direct]
    m = metrics(url)
    assert m["fastchat_kv_blocks_used"] == 0 and m["fastchat_requests_in_flight"] == 0
    assert m['fastchat_time_to_first_token_seconds_count'] >= 64
    assert m['fastchat_inter_token_latency_seconds_count'] >= 64 * 7 - 64   # a delta may carry merged text
    assert server_engine.block_manager.num_used_blocks == 0


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    url, engine = server
    before = metrics(url)['fastchat_engine_requests_total{outcome="aborted"}']
    with slow_steps(engine, 0.01):
        body = chat_body("Tell me a long story.", max_tokens=200, stream=True, ignore_eos=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(8)) if line]
            assert len(got) == 4 and engine.block_manager.num_used_blocks > 0   # generating, holding blocks
        # closing the response closed the connection: the server must abort and free at once
        wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.requests, timeout=5)
        m = metrics(url)
        assert m['fastchat_engine_requests_total{outcome="aborted"}'] == before + 1
        assert m["fastchat_kv_blocks_used"] == 0 and m["fastchat_requests_in_flight"] == 0

        # a non-streaming client that gives up (timeout) is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=chat_body("Again.", max_tokens=200, ignore_eos=True),
                       timeout=0.3)
        wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.requests, timeout=5)
        assert metrics(url)['fastchat_engine_requests_total{outcome="aborted"}'] == before + 2


LONG = "word " * 300   # about 300 tokens: more than the 256-token context
BAD = [   # (route, body: dict or raw bytes, param or None, what the message must mention)
    ("chat", b'{"messages": [', None, "not valid JSON"),
    ("chat", b"\xff\xfe not utf-8", None, "not valid JSON"),
    ("chat", [1, 2], None, "JSON object"),
    ("chat", {}, "messages", "required"),
    ("chat", {"messages": "hello"}, "messages", "non-empty list"),
    ("chat", {"messages": []}, "messages", "non-empty list"),
    ("chat", {"messages": ["hello"]}, "messages[0]", "object"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'wizard'"),
    ("chat", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content", "string"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "text"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "user turn"),
    ("chat", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages",
     "alternate"),
    ("chat", {"messages": [{"role": "user", "content": LONG}]}, "messages", "context"),
    ("chat", chat_body("hi", max_tokens="10"), "max_tokens", "integer"),
    ("chat", chat_body("hi", max_tokens=True), "max_tokens", "integer"),
    ("chat", chat_body("hi", max_tokens=0), "max_tokens", "at least 1"),
    ("chat", chat_body("hi", max_tokens=CONTEXT), "max_tokens", "at most"),
    ("chat", chat_body("hi", max_completion_tokens=-5), "max_completion_tokens", "at least 1"),
    ("chat", chat_body("hi", temperature="hot"), "temperature", "number"),
    ("chat", chat_body("hi", temperature=-1), "temperature", "[0, 2]"),
    ("chat", chat_body("hi", top_p=0), "top_p", "(0, 1]"),
    ("chat", chat_body("hi", top_k=-1), "top_k", "at least 0"),
    ("chat", chat_body("hi", top_k=2.5), "top_k", "integer"),
    ("chat", chat_body("hi", seed="abc"), "seed", "integer"),
    ("chat", chat_body("hi", n=0), "n", "between 1 and 16"),
    ("chat", chat_body("hi", stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    ("chat", chat_body("hi", stop=[""]), "stop", "non-empty"),
    ("chat", chat_body("hi", stop=7), "stop", "string"),
    ("chat", chat_body("hi", stream="yes"), "stream", "true or false"),
    ("chat", chat_body("hi", stream_options=[]), "stream_options", "object"),
    ("chat", chat_body("hi", ignore_eos=1), "ignore_eos", "true or false"),
    ("completions", {"prompt": ["a", [3.5]]}, "prompt[1]", "token ids"),
    ("completions", {"prompt": []}, "prompt", "a batch"),
    ("completions", {"prompt": [1, 10**6]}, "prompt", "token ids in [0, "),
    ("completions", {"prompt": ["a"] * 257}, "prompt", "at most 256"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
    ("completions", {"prompt": "hi", "max_tokens": 0, "echo": True}, "max_tokens", "'logprobs' too"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ("completions", {"prompt": "hi", "echo": "yes"}, "echo", "true or false"),
    ("chat", chat_body("hi", top_logprobs=3), "top_logprobs", "'logprobs': true"),
    ("chat", chat_body("hi", logprobs=True, top_logprobs=30), "top_logprobs", "between 0 and 20"),
    ("chat", chat_body("hi", presence_penalty=3), "presence_penalty", "[-2, 2]"),
    ("chat", chat_body("hi", frequency_penalty="x"), "frequency_penalty", "number"),
    ("chat", chat_body("hi", logit_bias={"abc": 1}), "logit_bias", "token ids"),
    ("chat", chat_body("hi", logit_bias={"1": 101}), "logit_bias", "[-100, 100]"),
    ("chat", chat_body("hi", logit_bias={"100000": 1}), None, "logit_bias"),
    ("chat", chat_body("hi", logit_bias={"\u00b2": 1}), "logit_bias", "token ids"),   # isdigit, not int()
    ("chat", chat_body("hi", logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
    ("completions", {"prompt": ["a"] * 256, "n": 16}, "n", "split it"),   # 4096 choices: never fits
    ("chat", chat_body("hi", max_tokens=5, min_tokens=6), "min_tokens", "between 0 and 5"),
    ("chat", chat_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    ("chat", chat_body("hi", tool_choice="auto"), "tool_choice", "not supported"),
    ("chat", chat_body("hi", response_format={"type": "json_object"}), "response_format", "not supported"),
    ("completions", {}, "prompt", "string"),
    ("completions", {"prompt": LONG}, "prompt", "context"),
    ("completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens", "at most"),
]


@pytest.mark.parametrize("route,body,param,mention", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_naming_the_problem(server, route, body, param, mention):
    url, _ = server
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", **kw, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and mention in error["message"], error


def test_unknown_route_and_method_get_json_errors(server):
    url, _ = server
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    counts = metrics(url)
    assert counts['fastchat_http_responses_total{route="other",status="404"}'] >= 1
    assert counts['fastchat_http_responses_total{route="/v1/chat/completions",status="405"}'] >= 1


def test_tool_calls_stream_as_marked_text_and_round_trip(server, reference):
    """The model's tool call and the pasted output come through as marker-wrapped text; sent back as history,
    the markers become the same special tokens again."""
    url, engine = server
    _, tok = reference
    sp = tok.encode_special
    call = [sp("<|python_start|>"), *tok.encode("2+3"), sp("<|python_end|>")]
    script = scripted_sampler(call + tok.encode(" so five") + [sp("<|assistant_end|>")])
    engine._sample = lambda seqs, logits: script(engine, seqs, logits)   # the model "decides" to call the tool
    try:
        body = chat_body("What is 2+3?", max_tokens=40, stream=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            chunks, done = sse(r.iter_lines())
    finally:
        del engine._sample
    text = streamed_text(chunks)
    assert done and text == "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> so five"
    assert finish_reasons(chunks) == {0: "stop"}
    # the follow-up request carries that answer back: its prompt must hold exactly the tokens generated
    first = tok.render_for_completion(body["messages"])
    generated = call + [sp("<|output_start|>"), *tok.encode("5"), sp("<|output_end|>"), *tok.encode(" so five"),
                        sp("<|assistant_end|>")]
    follow = body["messages"] + [{"role": "assistant", "content": text}, {"role": "user", "content": "thanks"}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": follow, "max_tokens": 1}, timeout=30)
    turn = [sp("<|user_start|>"), *tok.encode("thanks"), sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert r.json()["usage"]["prompt_tokens"] == len(first) + len(generated) + len(turn)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": assistant_parts(text)}]
    assert tok.render_conversation(messages)[0] == tok.render_for_completion(messages[:1]) + generated


def test_full_queue_gets_429_and_missing_key_401(checkpoint):
    key = {"Authorization": "Bearer sekrit"}
    with serve_in_thread(checkpoint, "--max-num-seqs", "1", "--max-queue", "0", "--api-key", "sekrit") as (url, eng):
        body = chat_body("hi", max_tokens=5)
        assert httpx.get(f"{url}/health").status_code == 200   # open: load balancers probe it
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=key).status_code == 200
        with slow_steps(eng, 0.01):
            long = chat_body("hi", max_tokens=200, stream=True, ignore_eos=True)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=key, timeout=30) as r:
                lines = r.iter_lines()
                next(lines)
                busy = httpx.post(f"{url}/v1/chat/completions", json=body, headers=key, timeout=30)
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
                assert busy.json()["error"]["code"] == "queue_full"
                too_many = httpx.post(f"{url}/v1/chat/completions", json=body | {"n": 2}, headers=key)
                assert too_many.status_code == 400 and "split it" in too_many.json()["error"]["message"]   # never fits
            wait_until(lambda: metrics(url)["fastchat_requests_in_flight"] == 0, timeout=5)
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=key, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert metrics(url)['fastchat_http_responses_total{route="/v1/chat/completions",status="429"}'] == 1


def test_sigterm_drains_in_flight_requests(checkpoint, tmp_path):
    log = tmp_path / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "fastchat_core.serve", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--port", "0", "--max-num-seqs", "1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while not (m := re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        url = m[1]
        # 3 choices one after the other (one sequence at a time): still generating long after the signal
        body = chat_body("Tell me everything.", max_tokens=200, n=3, stream=True, ignore_eos=True)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            chunks, done = sse(first + list(lines))
        assert done and finish_reasons(chunks) == {0: "length", 1: "length", 2: "length"}
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal after draining
        text = log.read_text()
        assert "Waiting for connections to close" in text and "Application shutdown complete" in text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- terminal chat ------------------------------------------------------------------------------------------

def test_chat_one_shot_prints_the_engines_answer(checkpoint, reference, capsys):
    engine, tok = reference
    prompt = tok.render_for_completion([{"role": "user", "content": "hello there"}])
    want = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.6, top_k=50, seed=3))[0]
    assert cli.main(["chat", "--checkpoint", str(checkpoint), "--device", "cpu", "-p", "hello there", "--seed", "3",
                     "--max-tokens", "12"]) == 0   # `fastchat chat ...`
    assert capsys.readouterr().out == want.text + "\n"


def test_chat_interactive_keeps_history_and_clears(checkpoint, reference, capsys, monkeypatch):
    engine, tok = reference
    lines = iter(["hello", "and then?", "/clear", "hello", "/bogus", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat_cli.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--seed", "5", "--max-tokens", "10"])
    out = capsys.readouterr().out
    params = SamplingParams(max_tokens=10, temperature=0.6, top_k=50, seed=5)
    first = engine.generate([tok.render_for_completion([{"role": "user", "content": "hello"}])], params)[0].text
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": assistant_parts(first)},
               {"role": "user", "content": "and then?"}]
    second = engine.generate([tok.render_for_completion(history)], params)[0].text
    expected = [f"assistant> {first}\n", f"assistant> {second}\n", "(new conversation)",
                f"assistant> {first}\n", "unknown command '/bogus'"]   # after /clear: the first answer again
    at = 0
    for piece in expected:
        at = out.index(piece, at) + len(piece)
    assert next(lines) == "never read"   # /exit stopped reading


def test_default_checkpoint_prefers_later_stages(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="--checkpoint"):
        default_checkpoint()
    for stage in ("base", "mid", "sft"):
        run = tmp_path / stage / "d1"
        (run / "step_000001").mkdir(parents=True)
        (run / "latest").write_text("step_000001")
    older = tmp_path / "sft" / "d2"
    (older / "step_000009").mkdir(parents=True)
    (older / "latest").write_text("step_000009")
    os.utime(older / "step_000009", (0, 0))
    assert default_checkpoint() == tmp_path / "sft" / "d1" / "step_000001"   # the newest sft run
    (tmp_path / "rl" / "d1").mkdir(parents=True)   # a run folder without a checkpoint does not count
    assert default_checkpoint().parts[-3] == "sft"

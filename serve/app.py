"""The HTTP server: OpenAI-compatible chat and text completions over one shared AsyncEngine, the web UI at /,
/health and Prometheus /metrics.

A request is validated (schemas.py) and checked against the engine before anything is queued, so a bad one gets a
4xx naming its fault and a full server a 429 with Retry-After; no body, however malformed, gets a 5xx. The body is
read up to --max-body-bytes and no further (413 past it, and the connection is closed rather than read to its end),
and its JSON parsing, validation and tokenization run in a worker thread: the event loop only moves bytes, so a
megabytes-long request does not stall other clients' streams. An accepted request runs as one task per choice, each
reading its engine stream; when the client goes away the tasks are cancelled, which aborts the engine requests and
frees their KV blocks at once. Streams are server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
Logprobs come in OpenAI's shapes: chat's {"content": [{token, logprob, bytes, top_logprobs}]}, completions'
{tokens, token_logprobs, top_logprobs, text_offset} (the chosen token among its top_logprobs, as OpenAI does).
Shutdown (SIGTERM, Ctrl-C) is uvicorn's: stop accepting, let in-flight responses finish, then the lifespan hook
stops the engine thread.
"""
import asyncio
import bisect
import contextlib
import hmac
import itertools
import json
import time
import uuid
from collections import Counter
from pathlib import Path

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fastchat_core.engine import AsyncEngine, QueueFull
from fastchat_core.serve.schemas import (MAX_BODY_BYTES, GenerationRequest, RequestError, chat_request,
                                         completion_request, parse_json)

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/models/{id}", "/v1/chat/completions", "/v1/completions")


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count, rendered by hand."""

    def __init__(self, name, help_, buckets):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)   # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float):
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1   # first bucket with le >= seconds
        self.sum += seconds

    def render(self) -> list[str]:
        lines, total = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"], 0
        for le, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return lines + [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {total}"]


class Metrics:
    def __init__(self):
        self.responses = Counter()   # (route, status) -> count
        self.ttft = Histogram("fastchat_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token (per choice).",
                              (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("fastchat_inter_token_latency_seconds", "Seconds between consecutive tokens of a choice.",
                             (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def render(self, engine: dict, in_flight: int) -> str:
        lines = ["# HELP fastchat_http_responses_total HTTP responses by route and status.",
                 "# TYPE fastchat_http_responses_total counter"]
        lines += [f'fastchat_http_responses_total{{route="{r}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.responses.items())]

        def metric(name, kind, help_, value, labels=""):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        lines += ["# HELP fastchat_engine_requests_total Engine requests by outcome.",
                  "# TYPE fastchat_engine_requests_total counter"]
        lines += [f'fastchat_engine_requests_total{{outcome="{k}"}} {engine[k]}' for k in ("finished", "aborted")]
        metric("fastchat_prompt_tokens_total", "counter", "Prompt tokens of all requests.", engine["prompt_tokens"])
        metric("fastchat_prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache.",
               engine["cached_tokens"])
        metric("fastchat_generation_tokens_total", "counter", "Tokens generated (tool output included).",
               engine["generated_tokens"])
        metric("fastchat_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               engine["preemptions"])
        metric("fastchat_requests_in_flight", "gauge", "Choices accepted and not yet finished.", in_flight)
        metric("fastchat_requests_waiting", "gauge", "Sequences queued in the engine (queue depth).", engine["waiting"])
        metric("fastchat_requests_running", "gauge", "Sequences in the engine's running batch.", engine["running"])
        metric("fastchat_kv_blocks_used", "gauge", "KV cache blocks held by sequences.", engine["kv_blocks_used"])
        metric("fastchat_kv_blocks_total", "gauge", "KV cache blocks in all.", engine["kv_blocks_total"])
        return "\n".join(lines + self.ttft.render() + self.itl.render()) + "\n"


class CountResponses:
    """ASGI middleware: counts responses by route and status for /metrics (unknown paths as "other", so
    scanners cannot blow up the label set)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = "/v1/models/{id}" if scope["path"].startswith("/v1/models/") else scope["path"]
        route = path if path in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.responses[route, message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


class Generation:
    """One accepted request: a task per choice pumps its engine stream into one queue. `close` cancels the
    tasks, and a cancelled stream aborts its engine request (freeing its KV blocks)."""

    def __init__(self, engine: AsyncEngine, req: GenerationRequest, live: set, metrics: Metrics):
        self.n, self.metrics, self.start = len(req.params), metrics, time.perf_counter()
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(engine, i, req.prompts[i // req.n], p))
                       for i, p in enumerate(req.params)]
        for task in self._tasks:   # `live` counts accepted choices until their task is done, cancelled or not
            live.add(task)
            task.add_done_callback(live.discard)

    async def _pump(self, engine, index, prompt_ids, params):
        try:
            async for delta in engine.stream(prompt_ids, params):
                self._queue.put_nowait((index, delta))
        except Exception as e:   # handed to the reader, which decides how to report it
            self._queue.put_nowait((index, e))

    async def deltas(self):
        """(choice index, Delta) until every choice has finished; a failed choice raises its error."""
        last, pending = [None] * self.n, self.n
        while pending:
            index, delta = await self._queue.get()
            if isinstance(delta, Exception):
                raise delta
            now = time.perf_counter()
            if last[index] is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe(now - last[index])
            last[index] = now
            pending -= delta.finished
            yield index, delta

    def close(self):
        for task in self._tasks:
            task.cancel()   # a no-op on finished tasks


def _engine_error(e: Exception) -> RequestError:
    if isinstance(e, QueueFull):
        return RequestError(f"the server is busy ({e})", code="queue_full", status=429, type="rate_limit_error",
                            headers={"Retry-After": "1"})
    if isinstance(e, ValueError):
        return RequestError(str(e))
    return RequestError(f"generation failed: {type(e).__name__}: {e}", code="engine_error", status=500,
                        type="server_error")


async def _until_disconnect(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


class ChatServer:
    """The routes' shared state: one AsyncEngine for all requests, the metrics, the accepted choices."""

    def __init__(self, engine: AsyncEngine, model_names: list[str], api_key: str | None, max_body_bytes: int):
        self.engine, self.model_names, self.api_key = engine, model_names, api_key
        self.max_body_bytes = max_body_bytes
        # request parsing runs in a thread, one at a time: the GIL lets one run anyway, and with fewer threads
        # holding it through long C calls (json.loads of megabytes) the event loop gets it back sooner
        self.parsing = asyncio.Semaphore(1)
        self.tokenizer = engine.tokenizer
        if self.tokenizer is None:
            raise ValueError("the server renders chats and decodes text: create the Engine with a tokenizer")
        self.token_chars = int(self.tokenizer.token_bytes().max())   # bounds a prompt's tokens from its length
        # one sequence holds at most this many tokens: the rotary table's length, or the whole KV cache
        self.context = engine.max_model_len
        self.capacity = engine.capacity
        self.metrics = Metrics()
        self.live: set[asyncio.Task] = set()
        self.webui = (Path(__file__).with_name("webui.html")).read_text()

    def _authorize(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                               "key the server was started with (--api-key)", code="invalid_api_key", status=401,
                               type="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    async def index(self, request):
        return HTMLResponse(self.webui)

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def prometheus(self, request):
        return PlainTextResponse(self.metrics.render(self.engine.metrics(), len(self.live)),
                                 media_type="text/plain; version=0.0.4")

    def _model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "fastchat", "max_model_len": self.context}

    async def models(self, request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model(name) for name in self.model_names]})

    async def model(self, request):
        self._authorize(request)
        name = request.path_params["id"]
        if name not in self.model_names:
            raise RequestError(f"the model {name[:100]!r} does not exist: this server serves "
                               f"{', '.join(map(repr, self.model_names))}", "model", code="model_not_found",
                               status=404)
        return JSONResponse(self._model(name))

    async def chat_completions(self, request):
        return await self._complete(request, chat=True)

    async def completions(self, request):
        return await self._complete(request, chat=False)

    async def _body(self, request) -> list[bytes]:
        """The JSON body's chunks, refused before it is read if its Content-Type is another, and as soon as it
        passes --max-body-bytes (whatever Content-Length says): a huge or endless upload is never held in memory.
        The chunks are joined by the parsing thread, so that the event loop copies no megabytes."""
        kind = request.headers.get("content-type")   # absent: taken as JSON, all that these routes read
        if kind is not None and kind.split(";")[0].strip().lower() != "application/json":
            raise RequestError(f"the Content-Type is {kind[:80]!r}: send the request as JSON, with the header "
                               "'Content-Type: application/json'", code="unsupported_media_type", status=415)
        too_large = RequestError(f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                 "bytes: shorten the conversation (or start the server with a larger "
                                 "--max-body-bytes)", code="request_too_large", status=413,
                                 headers={"Connection": "close"})   # and uvicorn stops reading the rest
        if int(request.headers.get("content-length") or 0) > self.max_body_bytes:   # digits: the HTTP parser checked
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
        return chunks

    def _parse(self, chunks: list[bytes], chat: bool) -> GenerationRequest:
        """Body chunks -> a validated, tokenized request: CPU work that grows with the body, so it runs in a thread
        while the event loop serves other clients."""
        parse = chat_request if chat else completion_request
        return parse(parse_json(b"".join(chunks)), self.tokenizer, self.context, self.token_chars, self.model_names)

    async def _complete(self, request, chat: bool):
        self._authorize(request)
        try:
            chunks = await self._body(request)
        except ClientDisconnect:
            return Response(status_code=499)   # gone mid-upload (nginx's code); nobody reads this
        async with self.parsing:
            req = await asyncio.to_thread(self._parse, chunks, chat)
        if len(req.params) > self.capacity:   # could never fit: not a "retry shortly"
            raise RequestError(f"the request asks for {len(req.params)} choices (prompts x n); this server runs at "
                               f"most {self.capacity} at once: split it", "n")
        # what only the engine knows (KV cache size, ...): refuse first, once per prompt (its n choices differ
        # only in their seeds)
        for i in range(0, len(req.params), req.n):
            try:
                self.engine.check_request(req.prompts[i // req.n], req.params[i])
            except ValueError as e:
                raise RequestError(str(e)) from None
        if len(self.live) + len(req.params) > self.capacity:
            raise RequestError(f"the server is at capacity ({len(self.live)} requests in flight, room for "
                               f"{self.capacity}): retry shortly", code="queue_full", status=429,
                               type="rate_limit_error", headers={"Retry-After": "1"})
        gen = Generation(self.engine, req, self.live, self.metrics)
        head = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, created=int(time.time()),
                    model=req.model)
        if req.stream:
            return StreamingResponse(self._events(gen, req, head, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.close))   # even if the stream never started
        results = await self._collect(gen, request.receive)
        if results is None:
            return Response(status_code=499)   # the client is gone (nginx's code); nobody reads this
        choices = []
        for i, r in enumerate(results):
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": r.text},
                          "logprobs": None if r.logprobs is None else self._chat_logprobs(r.token_ids, r.logprobs)}
            else:
                echo = self._echo(req, i, r.prompt_logprobs)
                logprobs = None
                if r.logprobs is not None:
                    logprobs = self._completion_logprobs(echo[1] + r.token_ids, echo[2] + r.logprobs)
                choice = {"index": i, "text": echo[0] + r.text, "logprobs": logprobs}
            choices.append(choice | {"finish_reason": r.finish_reason})
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                             "usage": _usage(req, results)})

    async def _collect(self, gen: Generation, receive):
        """Every choice's final Result, or None if the client disconnected first (the choices are aborted)."""
        async def run():
            results = [None] * gen.n
            async for index, delta in gen.deltas():
                if delta.finished:
                    results[index] = delta.result
            return results

        work, gone = asyncio.ensure_future(run()), asyncio.ensure_future(_until_disconnect(receive))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.cancel()
            gone.cancel()
            gen.close()
        if work not in done:
            return None
        try:
            return work.result()
        except Exception as e:
            raise _engine_error(e) from e

    async def _events(self, gen: Generation, req: GenerationRequest, head: dict, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, **extra):
            return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

        offsets = [0] * gen.n   # completions' text_offset, per choice: characters sent so far
        started = [False] * gen.n

        def choice(index, delta):
            if chat:
                logprobs = None if delta.logprobs is None else self._chat_logprobs(delta.new_token_ids, delta.logprobs)
                return {"index": index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": logprobs,
                        "finish_reason": delta.finish_reason}
            # the echoed prompt goes ahead of the first tokens (its logprobs come with them)
            text, ids, entries = ("", [], [])
            if not started[index]:
                prompt_lp = delta.prompt_logprobs or (delta.result and delta.result.prompt_logprobs)
                text, ids, entries = self._echo(req, index, prompt_lp)
            started[index] = True
            logprobs = None
            if delta.logprobs is not None:
                logprobs = self._completion_logprobs(ids + delta.new_token_ids, entries + delta.logprobs,
                                                     offsets[index])
                offsets[index] += sum(map(len, logprobs["tokens"]))
            return {"index": index, "text": text + delta.text, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason}

        results = [None] * gen.n
        try:
            if chat:   # OpenAI opens each choice with the role
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(gen.n)])
            async for index, delta in gen.deltas():
                if delta.finished:
                    results[index] = delta.result
                if delta.text or delta.finished or delta.logprobs or (req.echo and not started[index]):
                    yield event([choice(index, delta)])
            if req.include_usage:
                yield event([], usage=_usage(req, results))
        except Exception as e:   # the 200 headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps(_engine_error(e).body())}\n\n"
        finally:
            gen.close()
        yield "data: [DONE]\n\n"


    # ---- logprobs in OpenAI's shapes ----

    def _token(self, token_id: int) -> dict:
        raw = self.tokenizer.token_to_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}

    def _chat_logprobs(self, token_ids, entries) -> dict:
        """Chat's logprobs: per token, its logprob (null for pasted tool output) and the top alternatives."""
        content = []
        for t, entry in zip(token_ids, entries):
            logprob, top = entry or (None, [])
            content.append({**self._token(t), "logprob": logprob,
                            "top_logprobs": [{**self._token(i), "logprob": v} for i, v in top]})
        return {"content": content}

    def _completion_logprobs(self, token_ids, entries, offset=0) -> dict:
        """Completions' logprobs: token strings, their logprobs, each token's top alternatives and itself as
        {string: logprob}, and where each starts in the text (from `offset`). None entries stay null."""
        tokens = [self.tokenizer.decode([t]) for t in token_ids]
        starts = list(itertools.accumulate(map(len, tokens), initial=offset))[:-1]
        top = [None if e is None else {self.tokenizer.decode([i]): v for i, v in [(t, e[0]), *e[1]]}
               for t, e in zip(token_ids, entries)]
        return {"tokens": tokens, "token_logprobs": [e and e[0] for e in entries], "top_logprobs": top,
                "text_offset": starts}

    def _echo(self, req: GenerationRequest, index: int, prompt_logprobs) -> tuple[str, list, list]:
        """What echo puts ahead of choice `index`'s completion: (the prompt's text, its token ids, their logprob
        entries: null for the first token, which nothing predicts); nothing without echo."""
        if req.echo is None:
            return "", [], []
        p = index // req.n
        ids = req.prompts[p][req.echo[p]:]
        entries = ([None] + (prompt_logprobs or []))[req.echo[p]:]   # logprobs asked for: the prompt's are there
        return self.tokenizer.decode(ids), ids, entries


def _usage(req: GenerationRequest, results) -> dict:
    completion = sum(len(r.token_ids) for r in results)
    prompt = sum(map(len, req.prompts))   # each prompt counted once, whatever n is (as OpenAI does)
    cached = sum(r.num_cached_tokens for r in results[::req.n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _request_error(request, e: RequestError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request, e: HTTPException):
    """Starlette's 404 / 405 in OpenAI's error shape."""
    message = (f"{e.detail}: {request.method} {request.url.path}. This server answers POST /v1/chat/completions, "
               "POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics and GET / (the web UI)")
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": e.status_code}}
    return JSONResponse(body, status_code=e.status_code, headers=e.headers)


async def _server_error(request, e: Exception):
    body = {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error", "param": None,
                      "code": None}}
    return JSONResponse(body, status_code=500)


def build_app(engine: AsyncEngine, model_names: list[str] = ("fastchat",), api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app over a running AsyncEngine (which it closes at shutdown). model_names: what requests may
    name as their `model` (the first is the default); api_key: required as `Authorization: Bearer KEY` on
    /v1/* when set; max_body_bytes: larger request bodies get 413."""
    server = ChatServer(engine, list(model_names), api_key, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)   # uvicorn calls this after in-flight responses have finished

    routes = [Route("/", server.index), Route("/health", server.health), Route("/metrics", server.prometheus),
              Route("/v1/models", server.models), Route("/v1/models/{id:path}", server.model),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CountResponses, metrics=server.metrics)],
                    exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                        Exception: _server_error})
    app.state.server = server
    return app

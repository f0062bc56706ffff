"""The asynchronous engine: an Engine stepped in a background thread, streaming each request's deltas to
asyncio code (the server)."""
import asyncio
import queue
import threading
import uuid
from typing import AsyncIterator

from fastchat_core.engine.engine import Engine
from fastchat_core.engine.outputs import Delta
from fastchat_core.engine.sampler import SamplingParams


class QueueFull(RuntimeError):
    """Too many requests in flight; the server answers 429."""


class AsyncEngine:
    """Runs an Engine's steps in a background thread and streams each request's deltas to asyncio code.

    The thread owns the engine: requests and aborts reach it through a command queue and are applied
    between steps, and deltas go back to each stream's asyncio queue on its event loop. At most
    max_num_seqs + max_waiting requests may be in flight; beyond that `stream` raises QueueFull.
    """

    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fastchat-engine", daemon=True)
        self._thread.start()

    async def stream(self, prompt_ids, params: SamplingParams | None = None, request_id=None) -> AsyncIterator[Delta]:
        """Yield the request's deltas as they are produced. The first `__anext__` raises QueueFull when the
        engine is saturated and ValueError for a request that can never run, before anything is queued.
        Leaving early aborts the request and frees its blocks: a cancelled task does so at once; a consumer
        that just stops iterating should close the stream (`async with contextlib.aclosing(...)`)."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.engine.check_request(prompt_ids, params)
        if self._closed:
            raise RuntimeError("the AsyncEngine is closed")
        if len(self._streams) >= self.capacity:
            raise QueueFull(f"{len(self._streams)} requests in flight: try again later")
        request_id = uuid.uuid4().hex if request_id is None else request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        deltas = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), deltas)
        self._send(("add", prompt_ids, params, request_id))
        finished = False
        try:
            while not finished:
                delta = await deltas.get()
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finished
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(("abort", request_id))

    # ---- what a server needs to know, without reaching into .engine ----

    @property
    def capacity(self) -> int:
        """How many requests may be in flight: max_num_seqs running plus max_waiting queued."""
        return self.engine.scheduler.max_num_seqs + self.max_waiting

    @property
    def max_model_len(self) -> int:
        """The usable context: the most tokens (prompt + output) one request may reach."""
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_request(self, prompt_ids, params: SamplingParams):
        """Engine.check_request: safe to call from the event loop thread."""
        self.engine.check_request(prompt_ids, params)

    def metrics(self) -> dict:
        return {**self.engine.metrics(), "in_flight": len(self._streams)}

    def close(self):
        """Stop the background thread (in-flight streams get an error)."""
        self._closed = True
        self._wake.set()
        self._thread.join()

    def _send(self, command):
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, items):
        """Hand (request_id, delta or error) pairs to their streams, with one wake-up per event loop rather
        than one per item (a step yields a delta for every running sequence)."""
        batches = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:   # else the stream is gone; its abort is on the way
                loop, deltas = target
                batches.setdefault(loop, []).append((deltas, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:   # that event loop is closed
                pass

    def _run(self):
        engine = self.engine
        while not self._closed:
            self._wake.clear()
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                try:
                    if command[0] == "add":
                        engine.add_request(*command[1:])
                    else:
                        engine.abort(command[1])
                except Exception as e:   # e.g. a duplicate id: only that request fails
                    self._deliver([(command[-1], e)])
            if not engine.has_unfinished():
                self._wake.wait()
                continue
            in_flight = list(engine.requests)
            try:
                deltas = engine.step()
            except Exception as e:   # the engine aborted everything in flight: fail those streams, keep serving
                self._deliver([(request_id, e) for request_id in in_flight])
                continue
            self._deliver([(delta.request_id, delta) for delta in deltas])
        self._deliver([(request_id, RuntimeError("the AsyncEngine was closed")) for request_id in list(self._streams)])


def _put_all(batch):
    for deltas, item in batch:
        deltas.put_nowait(item)

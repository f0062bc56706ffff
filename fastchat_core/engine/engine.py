"""The synchronous engine: continuous batching over a paged KV cache.

Each `step()` asks the scheduler for a plan, then runs at most two forward passes: the batched decode (one
token per running sequence; replayed from a CUDA graph on the GPU) and one packed prefill over every prefill
chunk of the step. Keeping them apart is the simple correct choice: decode has fixed shapes a graph can
capture, prefill is ragged and compute-bound. Then it samples, pastes tool output (tool_calls.py), applies
the stop rules (outputs.py) and returns per-request deltas. `generate()` is the synchronous batch API;
AsyncEngine (async_engine.py) runs the steps in a background thread and streams deltas to asyncio code.
"""
import time
import uuid
from collections import deque
from typing import NamedTuple

import torch

from fastchat_core.engine.block_manager import BlockManager
from fastchat_core.engine.model_runner import ModelRunner, num_kv_blocks
from fastchat_core.engine.outputs import Delta, Result, detokenize, stop_reason, take_new_text
from fastchat_core.engine.sampler import SamplingParams, sample
from fastchat_core.engine.scheduler import Scheduler
from fastchat_core.engine.sequence import FINISHED, PENDING, Sequence
from fastchat_core.engine.tool_calls import ToolCalls


class _Launched(NamedTuple):
    """A step whose tokens are still on their way to the host."""
    seqs: list                 # the sequences that get a token, in row order
    forced: list               # per sequence: the pasted tool-output token, or None where it is sampled
    tokens: torch.Tensor       # sampled tokens on the device, one per None in forced
    host: torch.Tensor         # their copy in pinned host memory, complete once `event` has passed
    event: object              # CUDA event (None on the CPU)
    sampled: dict              # seq_id -> index into tokens
    dropped: set               # seq_ids whose token here is void (the previous one opened a tool call)


class Engine:
    """Continuous-batching generation over a paged KV cache; see the module docstring.

    `max_model_len` is the usable context: the most tokens (prompt + output) one request may reach, the
    smaller of the model's context (GPT.max_context) and the whole KV cache.
    """

    def __init__(self, model, tokenizer=None, *, num_blocks=None, block_size=16, kv_fraction=0.9, max_num_seqs=256,
                 max_num_batched_tokens=8192, enable_prefix_caching=True, use_cuda_graphs=True, overlap=True,
                 compile_decode=False, device=None):
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if num_blocks is None:
            num_blocks = num_kv_blocks(model, block_size, kv_fraction)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = min(model.max_context, num_blocks * block_size)
        self.runner = ModelRunner(model, self.block_manager, max_num_seqs, self.max_model_len, use_cuda_graphs,
                                  compile_decode)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()                            # unseeded requests: fresh randomness per engine
        self.tools = ToolCalls(tokenizer)
        self.tool_ids = self.tools.ids   # (python_start, python_end, output_start, output_end) or None
        self.eos_ids = set()
        if tokenizer is not None:
            self.eos_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.encode_special("<|bos|>")}
        self.requests: dict[str, Sequence] = {}
        self.pending: _Launched | None = None   # the step launched last, whose tokens are not processed yet
        self.overlap = overlap   # False: finish each step before returning (the synchronous baseline)
        self.counters = dict(requests=0, finished=0, aborted=0, prompt_tokens=0, cached_tokens=0,
                             generated_tokens=0)
        self.ttft = deque(maxlen=1000)    # seconds from add_request to the first token, recent requests
        self.itl = deque(maxlen=10000)    # seconds between consecutive tokens of a request

    # ---- requests ---------------------------------------------------------------------------------

    def check_request(self, prompt_ids, params: SamplingParams):
        """Raise ValueError with the fix for a request that could never run. Reads nothing that steps change,
        so AsyncEngine calls it from the event loop thread."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompt_ids) == 0:
            raise ValueError("empty prompt: pass at least one token id (a chat prompt starts with <|bos|>)")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}): encode text with the model's tokenizer")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(self._too_long(len(prompt_ids), params.max_tokens))
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings are matched on text: create the Engine with a tokenizer")

    def _too_long(self, n: int, max_tokens: int) -> str:
        """Why n prompt tokens + max_tokens exceed max_model_len: the model's context or the KV cache."""
        context = self.model.max_context
        if n >= context:
            return (f"prompt of {n} tokens is too long for the model's context of {context} tokens: "
                    f"shorten it to at most {context - 1}")
        if n + max_tokens > context:
            return (f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {context} "
                    f"tokens: lower max_tokens to at most {context - n}")
        return (f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs more than the whole KV cache "
                f"({self.max_model_len} tokens): lower max_tokens or give the engine more blocks "
                "(num_blocks, or a larger --kv-fraction)")

    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id=None) -> str:
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        self.check_request(prompt_ids, params)
        request_id = uuid.uuid4().hex if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_ids, params)
        seq.arrival_time = time.perf_counter()
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(prompt_ids)
        return request_id

    def abort(self, request_id) -> bool:
        """Drop a request and free its blocks now, whatever stage it is at; False if it is not in flight."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self.counters["aborted"] += 1
        self.counters["cached_tokens"] += seq.num_cached_tokens or 0
        return True

    def has_unfinished(self) -> bool:
        # a pending step whose sequences have all finished (their rows were computed ahead) is not work
        pending = self.pending is not None and any(s.status != FINISHED for s in self.pending.seqs)
        return self.scheduler.has_unfinished() or pending

    # ---- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Launch the next forward pass, then finish the previous one (their tokens reach the host while the
        GPU runs this one), so the host's bookkeeping overlaps the GPU instead of idling it. A sequence
        decoded last step decodes again now with its newest token still PENDING: the device fills it in.
        If that token ends the sequence or starts a tool call, the row computed ahead is dropped.

        If a step raises (a CUDA error, out of memory, a bug), its plan is left half applied (slots reserved,
        tokens PENDING), so every request in flight is aborted, freeing its blocks, before the error reaches
        the caller: the engine is clean and takes new requests."""
        try:
            return self._step()
        except BaseException:
            self.pending = None
            for request_id in list(self.requests):
                self.abort(request_id)
            raise

    def _step(self) -> list[Delta]:
        self.tools.collect()
        decodes, prefills = self.scheduler.schedule()
        prev, self.pending = self.pending, None
        if not decodes and not prefills and prev is None:
            self.tools.wait()
            return []
        if decodes or prefills:
            self.pending = self._launch(decodes, prefills, prev)
        deltas = self._finish(prev, self.pending) if prev is not None else []
        if not self.overlap and self.pending is not None:
            deltas += self._finish(self.pending, None)
            self.pending = None
        return deltas

    def _launch(self, decodes, prefills, prev) -> "_Launched | None":
        self.runner.refresh_weights()
        logits, ready = [], []
        if decodes:
            fill = None
            if prev is not None:
                rows = [i for i, seq in enumerate(decodes) if seq.token_ids[-1] == PENDING]
                if rows:
                    fill = (rows, prev.tokens, [prev.sampled[decodes[i].seq_id] for i in rows])
            logits.append(self.runner.decode(decodes, fill))
            ready += decodes
            for seq in decodes:
                seq.num_computed += 1
        if prefills:
            done = [seq.num_computed + n == seq.prefill_len for seq, n in prefills]
            logits.append(self.runner.prefill(prefills, done))
            for (seq, n), d in zip(prefills, done):
                seq.num_computed += n
                self.block_manager.mark_computed(seq, seq.num_computed)   # share the prompt from now on
                if d:
                    ready.append(seq)
        if not ready:
            return None
        # Pasted tool output where some is pending, sampled tokens elsewhere.
        for seq in ready:
            if seq.waits_on_tool:  # only after a preemption re-prefilled it mid-call: wait for the output
                self.tools.collect([seq], block=True)
        forced = [seq.forced.popleft() if seq.forced else None for seq in ready]
        rows = [i for i, f in enumerate(forced) if f is None]
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)   # decode-only steps: no 60 MB copy
        if len(rows) < len(ready):   # a device index, not a list: indexing with a list would sync
            logits = logits[self.runner.to_device(rows, torch.int64)]
        tokens = self._sample([ready[i] for i in rows], logits) if rows else logits.new_empty(0, dtype=torch.long)
        host, event = tokens, None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        for seq, f in zip(ready, forced):
            seq.token_ids.append(PENDING if f is None else f)
        return _Launched(ready, forced, tokens, host, event, {ready[i].seq_id: j for j, i in enumerate(rows)}, set())

    def _finish(self, prev: "_Launched", launched: "_Launched | None") -> list[Delta]:
        """Put the previous step's tokens in place and apply tools and stop rules to them."""
        if prev.event is not None:
            prev.event.synchronize()
        sampled = prev.host.tolist()
        ahead = {seq.seq_id: j for j, seq in enumerate(launched.seqs)} if launched is not None else {}
        now = time.perf_counter()
        deltas = []
        for seq, f in zip(prev.seqs, prev.forced):
            if seq.status == FINISHED or seq.seq_id in prev.dropped:   # aborted meanwhile, or computed for nothing
                continue
            token = f if f is not None else sampled[prev.sampled[seq.seq_id]]
            j = ahead.get(seq.seq_id)
            nxt = seq.token_ids.pop() if j is not None else None   # this step's token, computed ahead
            seq.token_ids[-1] = token
            delta = self._append(seq, token, now)
            if j is not None and not delta.finished:
                if launched.forced[j] is None and (seq.tool is not None or seq.forced):
                    # the token opened a tool call: what follows is pasted, so undo the row sampled ahead
                    launched.dropped.add(seq.seq_id)
                    self.block_manager.unappend_slot(seq)
                    seq.num_computed -= 1
                else:
                    seq.token_ids.append(nxt)
            deltas.append(delta)
        return deltas

    def _sample(self, seqs, logits) -> torch.Tensor:
        # the token being drawn is each sequence's next output token (the newest may be PENDING: it counts)
        return sample(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs], self.generator)

    def _append(self, seq: Sequence, token: int, now: float) -> Delta:
        """Account for a sequence's newest token, apply tools and stop rules, and say what is new."""
        self.counters["generated_tokens"] += 1
        if seq.last_token_time is None:
            self.ttft.append(now - seq.arrival_time)
        else:
            self.itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        reason, stopped_by_token = stop_reason(seq, token, self.eos_ids)
        if reason is None:
            self.tools.on_token(seq, token)
        if self.tokenizer is not None:
            reason = detokenize(seq, self.tokenizer, reason, stopped_by_token)
        text = take_new_text(seq, finished=reason is not None)
        result = None
        if reason:
            del self.requests[seq.request_id]
            self.scheduler.finish(seq, reason)
            self.counters["finished"] += 1
            self.counters["cached_tokens"] += seq.num_cached_tokens or 0
            result = Result(seq.output_ids, seq.text, reason, seq.num_prompt_tokens, seq.num_cached_tokens or 0)
        return Delta(seq.request_id, [token], reason is not None, reason, text, result)

    # ---- synchronous API --------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list | None = None) -> list[Result]:
        """Run a batch of prompts to completion; results in prompt order. Drives step() itself, so do not
        mix it with another consumer of step() on the same engine."""
        params = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: pass one, or one each")
        for prompt, p in zip(prompts, params):   # all or nothing: reject before queueing any
            self.check_request(list(prompt), p)
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]
        results = {}
        while len(results) < len(ids):
            for delta in self.step():
                if delta.finished:
                    results[delta.request_id] = delta.result
        return [results[i] for i in ids]

    def reset_prefix_cache(self) -> None:
        """Forget all cached prompt K/V, e.g. after the weights changed (RL samples between updates).
        Between generations only (raises while requests hold blocks)."""
        self.block_manager.reset_prefix_cache()

    def metrics(self) -> dict:
        """Counters and gauges for /metrics; ttft_s / itl_s are recent latency samples in seconds."""
        return {**self.counters, "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.block_manager.num_used_blocks, "kv_blocks_total": self.block_manager.num_blocks,
                "ttft_s": list(self.ttft), "itl_s": list(self.itl)}

"""The synchronous engine: continuous batching over a paged KV cache.

Each `step()` asks the scheduler for a plan, then runs at most two forward passes: the batched decode (one
token per running sequence; replayed from a CUDA graph on the GPU) and one packed prefill over every prefill
chunk of the step. Keeping them apart is the simple correct choice: decode has fixed shapes a graph can
capture, prefill is ragged and compute-bound. Then it samples, pastes tool output (tool_calls.py), applies
the stop rules (outputs.py) and returns per-request deltas. Log-probabilities (of output tokens, and of the
prompt's for prompt scoring) are computed on the device in the same step and reach the host with the tokens. `generate()` is the synchronous batch API;
AsyncEngine (async_engine.py) runs the steps in a background thread and streams deltas to asyncio code.
"""
import itertools
import time
import uuid
from collections import deque
from typing import NamedTuple

import torch

from fastchat_core.engine.block_manager import BlockManager
from fastchat_core.engine.model_runner import ModelRunner, num_kv_blocks
from fastchat_core.engine.outputs import Delta, Result, detokenize, stop_reason, take_new_text
from fastchat_core.engine.sampler import SamplingParams, penalize, sample, token_logprobs
from fastchat_core.engine.scheduler import Scheduler
from fastchat_core.engine.sequence import FINISHED, PENDING, Sequence
from fastchat_core.engine.tool_calls import ToolCalls


class _Launched(NamedTuple):
    """A step whose tokens are still on their way to the host."""
    seqs: list                 # the sequences that get a token, in row order
    forced: list               # per sequence: the pasted tool-output token, or None where it is sampled
    tokens: torch.Tensor       # sampled tokens on the device, one per None in forced
    host: list                 # host copies, complete once `event` has passed: tokens, then the 3 tensors of
                               # token_logprobs for `logprobs` (if any), then those for `scored` (if any)
    event: object              # CUDA event (None on the CPU)
    sampled: dict              # seq_id -> index into tokens
    dropped: set               # seq_ids whose token here is void (the previous one opened a tool call)
    logprobs: dict             # seq_id -> its row of the output logprobs (sequences that asked for them)
    scored: list               # (seq, c, m): prompt_logprobs[c:c + m] are the next m rows of the prompt's
    prompt_only: list          # sequences of max_tokens 0 whose prompt is now scored: they end without a token


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
        if not all(isinstance(t, int) and 0 <= t < vocab for t in [*params.logit_bias, *params.stop_token_ids]):
            raise ValueError(f"logit_bias and stop_token_ids name token ids: ints in [0, {vocab})")
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
        scored, prompt_lp, prompt_only = [], (), []
        if prefills:
            done = [seq.num_computed + n == seq.prefill_len for seq, n in prefills]
            counts = [n if seq.scores_prompt else int(d) for (seq, n), d in zip(prefills, done)]
            out = self.runner.prefill(prefills, counts)
            if any(seq.scores_prompt for seq, _ in prefills):
                out, scored, prompt_lp = self._score_prompts(prefills, counts, done, out)
            logits.append(out)
            for (seq, n), d in zip(prefills, done):
                seq.num_computed += n
                self.block_manager.mark_computed(seq, seq.num_computed)   # share the prompt from now on
                if d:   # a prompt scored for nothing else has no logits row here (_score_prompts)
                    (ready if seq.params.max_tokens else prompt_only).append(seq)
        if not ready and not scored:
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
        seqs = [ready[i] for i in rows]
        tokens = (self._sample(seqs, self._penalize(seqs, logits, prev)) if rows
                  else logits.new_empty(0, dtype=torch.long))
        lp_rows = [j for j, seq in enumerate(seqs) if seq.params.logprobs is not None]
        output_lp = ()
        if lp_rows:   # from the raw logits: before penalties, temperature and filters
            sel = self.runner.to_device(lp_rows, torch.int64)
            output_lp = token_logprobs(logits[sel], tokens[sel], max(seqs[j].params.logprobs for j in lp_rows))
        host, event = self._to_host([tokens, *output_lp, *prompt_lp])
        for seq, f in zip(ready, forced):
            seq.token_ids.append(PENDING if f is None else f)
        return _Launched(ready, forced, tokens, host, event, {seq.seq_id: j for j, seq in enumerate(seqs)}, set(),
                         {seqs[j].seq_id: r for r, j in enumerate(lp_rows)}, scored, prompt_only)

    def _finish(self, prev: "_Launched", launched: "_Launched | None") -> list[Delta]:
        """Put the previous step's tokens and logprobs in place and apply tools and stop rules to them."""
        if prev.event is not None:
            prev.event.synchronize()
        sampled = prev.host[0].tolist()
        output_lp = _entries(prev.host[1:4]) if prev.logprobs else []
        if prev.scored:
            prompt_lp = _entries(prev.host[-3:])
            for seq, c, m in prev.scored:
                k = seq.params.prompt_logprobs   # over what a prefill before a preemption gave:
                seq.prompt_logprobs[c:c + m] = [(lp, top[:k]) for lp, top in prompt_lp[:m]]
                del prompt_lp[:m]
        ahead = {seq.seq_id: j for j, seq in enumerate(launched.seqs)} if launched is not None else {}
        now = time.perf_counter()
        deltas = [Delta(seq.request_id, [], True, "length", result=self._retire(seq, "length"))
                  for seq in prev.prompt_only if seq.status != FINISHED]
        for seq, f in zip(prev.seqs, prev.forced):
            if seq.status == FINISHED or seq.seq_id in prev.dropped:   # aborted meanwhile, or computed for nothing
                continue
            token = f if f is not None else sampled[prev.sampled[seq.seq_id]]
            j = ahead.get(seq.seq_id)
            nxt = seq.token_ids.pop() if j is not None else None   # this step's token, computed ahead
            seq.token_ids[-1] = token
            r = prev.logprobs.get(seq.seq_id)   # None for pasted tool output: the model did not draw it
            entry = None if r is None else (output_lp[r][0], output_lp[r][1][:seq.params.logprobs])
            delta = self._append(seq, token, now, entry)
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

    def _penalize(self, seqs, logits, prev: "_Launched | None") -> torch.Tensor:
        """The logits after each sequence's logit_bias, penalties and min_tokens (the same tensor without any)."""
        if not any(s.params.adjusts_logits for s in seqs):
            return logits
        pen = [s for s in seqs if s.params.penalized]
        history = None
        if pen:
            outs = [s.output_ids for s in pen]
            width = max(1, *map(len, outs))
            history = self.runner.to_device([o + [-1] * (width - len(o)) for o in outs], torch.int64)
            # a newest token still PENDING is on the device, among the previous step's samples
            late = [(r, len(o) - 1, prev.sampled[s.seq_id]) for r, (s, o) in enumerate(zip(pen, outs))
                    if o and o[-1] == PENDING]
            if late:
                r, c, src = (self.runner.to_device(x, torch.int64) for x in zip(*late))
                history[r, c] = prev.tokens[src]
        return penalize(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs], history,
                        self.eos_ids)

    def _score_prompts(self, prefills, counts, done, out):
        """Split a prefill's logits (counts[i] rows per chunk) into the rows sampled from (the last of each
        finished chunk that generates) and the logprobs of the prompt tokens the scored chunks predict:
        (sampling rows, [(seq, c, m)]: prompt_logprobs[c:c + m] in order, token_logprobs' three tensors)."""
        last, rows, targets, scored = [], [], [], []
        for (seq, n), d, end in zip(prefills, done, itertools.accumulate(counts)):
            if d and seq.params.max_tokens:
                last.append(end - 1)
            if seq.scores_prompt:   # row c + i predicts token c + i + 1; the prompt's last row predicts output
                c = seq.num_computed
                m = min(n, seq.num_prompt_tokens - 1 - c)
                rows += range(end - n, end - n + m)
                targets += seq.token_ids[c + 1:c + 1 + m]
                scored.append((seq, c, m))
        k = max(seq.params.prompt_logprobs for seq, _, _ in scored)
        lp = token_logprobs(out[self.runner.to_device(rows, torch.int64)],
                            self.runner.to_device(targets, torch.int64), k)
        return out[self.runner.to_device(last, torch.int64)], scored, lp

    def _to_host(self, tensors):
        """(host copies of device tensors, the CUDA event after which they are complete: None on the CPU).
        Pinned and asynchronous on CUDA, so that the next step is queued before these arrive."""
        if not tensors[0].is_cuda:
            return tensors, None
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def _retire(self, seq: Sequence, reason: str) -> Result:
        """Release a sequence that has finished and return its result."""
        del self.requests[seq.request_id]
        self.scheduler.finish(seq, reason)
        self.counters["finished"] += 1
        self.counters["cached_tokens"] += seq.num_cached_tokens or 0
        return Result(seq.output_ids, seq.text, reason, seq.num_prompt_tokens, seq.num_cached_tokens or 0,
                      seq.logprobs, seq.prompt_logprobs)

    def _append(self, seq: Sequence, token: int, now: float, logprob=None) -> Delta:
        """Account for a sequence's newest token (and its logprob entry, when asked for), apply tools and stop
        rules, and say what is new."""
        self.counters["generated_tokens"] += 1
        if seq.last_token_time is None:
            self.ttft.append(now - seq.arrival_time)
        else:
            self.itl.append(now - seq.last_token_time)
        seq.last_token_time = now
        if seq.logprobs is not None:
            seq.logprobs.append(logprob)
        reason, stopped_by_token = stop_reason(seq, token, self.eos_ids)
        if reason is None:
            self.tools.on_token(seq, token)
        if self.tokenizer is not None:
            reason = detokenize(seq, self.tokenizer, reason, stopped_by_token)
        text = take_new_text(seq, finished=reason is not None)
        result = self._retire(seq, reason) if reason else None
        return Delta(seq.request_id, [token], reason is not None, reason, text, result,
                     None if seq.logprobs is None else [logprob],
                     seq.prompt_logprobs if seq.num_output_tokens == 1 else None)

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


def _entries(host) -> list:
    """token_logprobs' three host tensors -> per row (logprob, [(token id, logprob), ...] best first), with the
    batch's widest k alternatives (cut to each request's own by the caller)."""
    chosen, values, ids = (t.tolist() for t in host)
    return [(lp, list(zip(i, v))) for lp, i, v in zip(chosen, ids, values)]

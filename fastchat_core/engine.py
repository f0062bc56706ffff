"""The inference engine: continuous batching over a paged KV cache.

Each `step()` asks the scheduler for a plan, then runs at most two forward passes: the batched decode (one
token per running sequence; replayed from a CUDA graph on the GPU) and one packed prefill over every prefill
chunk of the step. Keeping them apart is the simple correct choice: decode has fixed shapes a graph can
capture, prefill is ragged and compute-bound. Then it samples, pastes tool output, applies the stop rules
and returns per-request deltas. `generate()` is the synchronous batch API; `AsyncEngine` runs the steps in
a background thread and streams deltas to asyncio code (the server).

Tool use, as nanochat does it: when the model closes <|python_start|> code <|python_end|>, the code runs
through tools.calculator (pure arithmetic, in process) or else tools.run_python (sandboxed child process,
run on a worker thread so that only that sequence pauses while it runs), and <|output_start|> result
<|output_end|> is forced into the sequence one token per step instead of sampling. Those tokens count toward max_tokens, so prompt + max_tokens always bounds a sequence's length.
"""
import asyncio
import concurrent.futures
import itertools
import math
import queue
import threading
import time
import uuid
from collections import deque
from typing import AsyncIterator, NamedTuple

import torch

from fastchat_core import ops, tools
from fastchat_core.attention import PagedBatch
from fastchat_core.kvcache import BlockManager, num_blocks_for_memory
from fastchat_core.sampler import SamplingParams, sample
from fastchat_core.scheduler import FINISHED, PENDING, Scheduler, Sequence


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph; a batch runs padded up to the next one. Steps of 16
    up to 256 (of 64 beyond) keep the padding small while the batch drains: with powers of two, 130
    sequences ran the GEMMs, norms and logits of 256."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(320, max_num_seqs, 64)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def qkv_parts(model) -> list[tuple]:
    """Per layer, the (c_q, c_k, c_v) weights the engine concatenates for one GEMM. Read from the modules
    each time: a load_state_dict(assign=True) puts new Parameters there."""
    return [(b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight) for b in model.blocks]


class Result(NamedTuple):
    token_ids: list[int]        # generated tokens (tool output included; a stop token is the last one)
    text: str                   # their text without a stop token, cut before a stop string ("" without tokenizer)
    finish_reason: str          # "stop" (EOS, stop token or stop string), "length" or "abort"
    num_prompt_tokens: int
    num_cached_tokens: int      # prompt tokens served from the prefix cache


class Delta(NamedTuple):
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str = ""              # new text; held back while it could still become a stop string
    result: Result | None = None   # the whole result, on the final delta


class _Launched(NamedTuple):
    """A step whose tokens are still on their way to the host."""
    seqs: list                 # the sequences that get a token, in row order
    forced: list               # per sequence: the pasted tool-output token, or None where it is sampled
    tokens: torch.Tensor       # sampled tokens on the device, one per None in forced
    host: torch.Tensor         # their copy in pinned host memory, complete once `event` has passed
    event: object              # CUDA event (None on the CPU)
    sampled: dict              # seq_id -> index into tokens
    dropped: set               # seq_ids whose token here is void (the previous one opened a tool call)


class QueueFull(RuntimeError):
    """Too many requests in flight; the server answers 429."""


class ModelRunner:
    """Owns the KV cache tensors and runs the model's paged forward for a planned batch."""

    def __init__(self, model, block_manager: BlockManager, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool, compile_decode: bool = False):
        cfg, p = model.config, next(model.parameters())
        self.model, self.bm, self.device = model, block_manager, p.device
        # torch.compile fuses the decode step's norms, residual adds, ReLU^2 and logit softcap (the custom
        # ops stay calls and write the caches in place); batch sizes are symbolic, so one compile serves
        # every graph bucket. Opt-in: it costs a compile at start-up.
        self._decode_forward = (torch.compile(model.forward_paged, dynamic=True, fullgraph=True) if compile_decode
                                else model.forward_paged)
        shape = (block_manager.num_blocks, block_manager.block_size, cfg.n_kv_head, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=p.dtype, device=self.device),
                           torch.zeros(shape, dtype=p.dtype, device=self.device)) for _ in range(cfg.n_layer)]
        self.max_blocks = math.ceil(max_model_len / block_manager.block_size)
        # q, k and v in one GEMM: at decode batch sizes each of the three small GEMMs costs about what their
        # concatenation does (H200 profile at 232 sequences: 6.4 us each). The engine keeps the concatenated
        # copy (d20: 197 MB in bf16, 393 MB in fp32) and refreshes it in place (CUDA graphs read it where it
        # is) when the model's weights change: RL trains the model it samples from. (The prefix cache does
        # not follow them: after an update, Engine.reset_prefix_cache(), as RL's rollout does.)
        with torch.no_grad():
            self.qkv_weights = [torch.cat(parts) for parts in qkv_parts(model)]
        self._qkv_state = self._weights_state()
        self.graphs = {}   # batch size -> (graph, its output logits)
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs)

    def _weights_state(self):
        """What tells that a q/k/v weight changed: which tensor, where its data is, its version counter
        (bumped by in-place updates: optimizer steps, load_state_dict). Writes through `.data` bump no
        counter; after those call refresh_weights(force=True). Inference tensors have no counter."""
        return [(id(w), w.data_ptr(), None if w.is_inference() else w._version)
                for parts in qkv_parts(self.model) for w in parts]

    def refresh_weights(self, force=False):
        """Copy the q, k, v weights into their concatenation again if any changed since the last copy."""
        state = self._weights_state()
        if force or state != self._qkv_state:
            with torch.no_grad():
                for fused, parts in zip(self.qkv_weights, qkv_parts(self.model)):
                    torch.cat(parts, out=fused)
            self._qkv_state = state

    def _host(self, data, dtype):
        # pinned, so the copy to the GPU is asynchronous (the caching host allocator keeps it alive until done)
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _tensor(self, data, dtype):
        return self._host(data, dtype).to(self.device, non_blocking=True)

    def _tables(self, seqs) -> torch.Tensor:
        """The sequences' block tables as one zero-padded (B, widest) int32 host tensor, pinned on CUDA. Filled
        row by row through numpy: far cheaper than torch.tensor on a list of lists, which was a large share
        of a decode step's host time at 256 sequences. A fresh buffer each step: the last one may still be
        on its way to the GPU."""
        tables = [self.bm.block_table(s) for s in seqs]
        out = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        rows = out.numpy()
        for row, table in zip(rows, tables):
            row[:len(table)] = table
        return out

    def copy_blocks(self, copies):
        mapping = self._tensor(copies, torch.int64)
        for k_cache, v_cache in self.kv_caches:
            ops.copy_blocks(k_cache, v_cache, mapping)

    def decode(self, seqs, fill=None) -> torch.Tensor:
        """Logits (B, V) for the newest token of each sequence, whose slot is already reserved. Under CUDA
        graphs they are a view of the one buffer every graph writes: use them (queue work on them) before
        the next decode, never keep them.
        fill = (rows, tokens, src): those rows' newest token is still PENDING on the host; it is tokens[src],
        a device tensor from the previous step's sampling."""
        ids = [s.token_ids[-1] for s in seqs]
        ctx = [len(s.token_ids) for s in seqs]
        pos = [n - 1 for n in ctx]
        slots = [self.bm.slot_mapping(s, n - 1, n)[0] for s, n in zip(seqs, ctx)]
        n = len(seqs)
        bs = min((b for b in self.graphs if b >= n), default=None)   # the smallest captured size that fits
        if bs is None:
            tables = self._tables(seqs).to(self.device, non_blocking=True)
            batch = PagedBatch(False, self._tensor(slots, torch.int64), tables, self._tensor(ctx, torch.int32))
            ids = self._fill(self._tensor(ids, torch.int64), fill)
            return self._decode_forward(ids, self._tensor(pos, torch.int64), batch, self.kv_caches,
                                        qkv_weights=self.qkv_weights)
        # Pad to the captured size: padding rows write nowhere (slot -1) and read one token of their first block.
        # Table entries past a row's context are never read, so only the columns in use are copied.
        pad = bs - n
        s_ids, s_pos, s_slots, s_ctx, s_tables = self.static
        s_ids[:bs].copy_(self._host(ids + [0] * pad, torch.int64), non_blocking=True)
        self._fill(s_ids, fill)
        s_pos[:bs].copy_(self._host(pos + [0] * pad, torch.int64), non_blocking=True)
        s_slots[:bs].copy_(self._host(slots + [-1] * pad, torch.int64), non_blocking=True)
        s_ctx[:bs].copy_(self._host(ctx + [1] * pad, torch.int32), non_blocking=True)
        tables = self._tables(seqs)
        s_tables[:n, :tables.size(1)].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]

    def _fill(self, ids, fill):
        if fill is not None:
            rows, tokens, src = fill
            ids[self._tensor(rows, torch.int64)] = tokens[self._tensor(src, torch.int64)]
        return ids

    def prefill(self, chunks, want_logits) -> torch.Tensor:
        """One packed forward over chunks [(seq, n)]: computes token_ids[num_computed:+n] of each; returns the
        logits of each chunk's last token where want_logits[i] (the chunks that finish their prefill)."""
        ids, pos, slots, qlens, ctxs = [], [], [], [], []
        for seq, n in chunks:
            c = seq.num_computed
            ids += seq.token_ids[c:c + n]
            pos += range(c, c + n)
            slots += self.bm.slot_mapping(seq, c, c + n)
            qlens.append(n)
            ctxs.append(c + n)
        last = list(itertools.accumulate(qlens))
        rows = [end - 1 for end, want in zip(last, want_logits) if want]
        batch = PagedBatch(True, self._tensor(slots, torch.int64),
                           self._tables([s for s, _ in chunks]).to(self.device, non_blocking=True),
                           self._tensor(ctxs, torch.int32), qlens, ctxs)
        return self.model.forward_paged(self._tensor(ids, torch.int64), self._tensor(pos, torch.int64), batch,
                                        self.kv_caches, logits_at=self._tensor(rows, torch.int64),
                                        qkv_weights=self.qkv_weights)

    @torch.inference_mode()
    def _capture_graphs(self, max_num_seqs):
        """One CUDA graph per decode batch-size bucket, largest first so the smaller ones reuse its memory pool.
        The block-table width is fixed at the longest possible sequence. Every graph writes its logits into
        the same buffer (one per graph would hold ~0.6 GB at d20's vocabulary for 20 buckets)."""
        sizes = graph_batch_sizes(max_num_seqs)
        m = max_num_seqs
        i32, i64 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.int64, device=self.device)
        # ids, positions, slots, context lengths, block tables; every row starts as padding
        self.static = (torch.zeros(m, **i64), torch.zeros(m, **i64), torch.full((m,), -1, **i64), torch.ones(m, **i32),
                       torch.zeros(m, self.max_blocks, **i32))
        s_ids, s_pos, s_slots, s_ctx, s_tables = self.static
        logits = torch.empty(m, self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        pool = None
        for bs in reversed(sizes):
            args = (s_ids[:bs], s_pos[:bs], PagedBatch(False, s_slots[:bs], s_tables[:bs], s_ctx[:bs]), self.kv_caches)
            # warm-up: compiling, Triton autotuning, cuBLAS set-up are not captured
            self._decode_forward(*args, out=logits[:bs], qkv_weights=self.qkv_weights)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_forward(*args, out=logits[:bs], qkv_weights=self.qkv_weights)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits[:bs])
        torch.cuda.synchronize(self.device)


class Engine:
    """Continuous-batching generation over a paged KV cache; see the module docstring."""

    def __init__(self, model, tokenizer=None, *, num_blocks=None, block_size=16, kv_fraction=0.9, max_num_seqs=256,
                 max_num_batched_tokens=8192, enable_prefix_caching=True, use_cuda_graphs=True, overlap=True,
                 compile_decode=False, device=None):
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        p, cfg = next(model.parameters()), model.config
        self.device = p.device
        if num_blocks is None:
            if self.device.type == "cuda":
                # the runner's concatenated q/k/v weights come out of the same free memory
                qkv = sum(w.nbytes for parts in qkv_parts(model) for w in parts)
                free = torch.cuda.mem_get_info(self.device)[0] - qkv
                num_blocks = num_blocks_for_memory(free, kv_fraction, cfg.n_layer, cfg.n_kv_head, cfg.head_dim,
                                                   block_size, p.element_size())
            else:
                num_blocks = 512
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.max_context = model.cos.size(0)            # the rotary table: 4x the training length
        self.cache_tokens = num_blocks * block_size
        self.runner = ModelRunner(model, self.block_manager, max_num_seqs,
                                  min(self.max_context, self.cache_tokens), use_cuda_graphs, compile_decode)
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()                            # unseeded requests: fresh randomness per engine
        # sandboxed tool calls run beside the steps, so a slow one pauses only its own sequence
        self.tool_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")
        self.tool_waiters: set[Sequence] = set()   # sequences whose tool call is still running
        self.eos_ids, self.tool_ids = set(), None
        if tokenizer is not None:
            sp = tokenizer.encode_special
            self.eos_ids = {sp("<|assistant_end|>"), sp("<|bos|>")}
            self.tool_ids = tuple(sp(f"<|{t}|>") for t in ("python_start", "python_end", "output_start", "output_end"))
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
        n, total = len(prompt_ids), len(prompt_ids) + params.max_tokens
        if n >= self.max_context:
            raise ValueError(f"prompt of {n} tokens is too long for the model's context of {self.max_context} "
                             f"tokens: shorten it to at most {self.max_context - 1}")
        if total > self.max_context:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                             f"of {self.max_context} tokens: lower max_tokens to at most {self.max_context - n}")
        if total > self.cache_tokens:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs more than the whole KV "
                             f"cache ({self.cache_tokens} tokens): lower max_tokens or give the engine more blocks "
                             "(num_blocks, or a larger kv_fraction)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings are matched on text: create the Engine with a tokenizer")

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
        self._collect_tools()
        decodes, prefills, copies = self.scheduler.schedule()
        prev, self.pending = self.pending, None
        if not decodes and not prefills and prev is None:
            self._wait_for_tools()
            return []
        if decodes or prefills:
            self.pending = self._launch(decodes, prefills, copies, prev)
        deltas = self._finish(prev, self.pending) if prev is not None else []
        if not self.overlap and self.pending is not None:
            deltas += self._finish(self.pending, None)
            self.pending = None
        return deltas

    def _launch(self, decodes, prefills, copies, prev) -> "_Launched | None":
        self.runner.refresh_weights()
        if copies:
            self.runner.copy_blocks(copies)
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
                self._collect_tools([seq], block=True)
        forced = [seq.forced.popleft() if seq.forced else None for seq in ready]
        rows = [i for i, f in enumerate(forced) if f is None]
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)   # decode-only steps: no 60 MB copy
        if len(rows) < len(ready):   # a device index, not a list: indexing with a list would sync
            logits = logits[self.runner._tensor(rows, torch.int64)]
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
        p = seq.params
        stopped_by_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids)
        reason = "stop" if stopped_by_token else "length" if seq.num_output_tokens >= p.max_tokens else None
        if reason is None and self.tool_ids and token == self.tool_ids[1]:
            self._call_tool(seq)
        if self.tokenizer is not None:
            reason = self._update_text(seq, reason, stopped_by_token)
        held = 0 if reason else max(map(len, p.stop), default=1) - 1
        text = seq.text[seq.sent_chars:max(seq.sent_chars, len(seq.text) - held)]
        seq.sent_chars += len(text)
        result = None
        if reason:
            del self.requests[seq.request_id]
            self.scheduler.finish(seq, reason)
            self.counters["finished"] += 1
            self.counters["cached_tokens"] += seq.num_cached_tokens or 0
            result = Result(seq.output_ids, seq.text, reason, seq.num_prompt_tokens, seq.num_cached_tokens or 0)
        return Delta(seq.request_id, [token], reason is not None, reason, text, result)

    def _update_text(self, seq: Sequence, reason, stopped_by_token) -> str | None:
        """Decode the new tokens (not a stop token) into seq.text and look for stop strings; returns the reason."""
        end = seq.num_output_tokens - stopped_by_token
        pending = seq.token_ids[seq.num_prompt_tokens + seq.read_offset:seq.num_prompt_tokens + end]
        if pending:
            piece = self.tokenizer.decode(pending)
            # A character split across tokens decodes as U+FFFD until its last byte (at most 4 tokens) arrives.
            if reason or not piece.endswith("\ufffd") or len(pending) >= 4:
                old = len(seq.text)
                seq.text += piece
                seq.read_offset = end
                longest = max(map(len, seq.params.stop), default=0)
                hits = [i for i in (seq.text.find(s, max(0, old - longest + 1)) for s in seq.params.stop) if i >= 0]
                if hits:
                    seq.text = seq.text[:min(hits)]
                    return "stop"
        return reason

    def _call_tool(self, seq: Sequence):
        """The model closed a tool call: run the code since the last <|python_start|> and queue its output."""
        start, end, out_start, out_end = self.tool_ids
        ids = seq.token_ids
        for i in range(len(ids) - 2, -1, -1):
            if ids[i] == end:
                return   # the last call was closed already: this <|python_end|> has no code to run
            if ids[i] == start:
                break
        else:
            return
        code = self.tokenizer.decode(ids[i + 1:-1])
        output = tools.calculator(code)
        if output is not None:  # pure arithmetic: answered in process, at once
            seq.forced.extend([out_start, *self.tokenizer.encode(output.strip()), out_end])
        else:
            seq.forced.append(out_start)
            seq.tool = self.tool_pool.submit(lambda: tools.run_python(code).output)
            self.tool_waiters.add(seq)

    def _collect_tools(self, seqs=None, block=False):
        """Paste the output of finished tool calls into their sequences."""
        for seq in seqs if seqs is not None else list(self.tool_waiters):
            if seq.tool is not None and (block or seq.tool.done()):
                output = seq.tool.result()
                seq.tool = None
                self.tool_waiters.discard(seq)
                seq.forced.extend([*self.tokenizer.encode(output.strip()), self.tool_ids[3]])

    def _wait_for_tools(self, timeout=0.05):
        """Every runnable sequence is waiting on a tool: sleep until one finishes instead of spinning."""
        pending = [s.tool for s in self.tool_waiters]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

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
        if len(self._streams) >= self.engine.scheduler.max_num_seqs + self.max_waiting:
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

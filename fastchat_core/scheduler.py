"""Continuous batching: which sequences run in the next engine step, and how many of their tokens.

Every step serves the running decodes first (one token each, oldest first), then spends what is left of
the token budget on prefill: first the sequences whose prompt is part way through, then new ones from the
waiting queue in arrival order. A long prompt is cut into chunks across steps (chunked prefill), so it never
stalls the decodes. Blocks are reserved for a sequence's whole prompt when it is admitted; a decode needs a
new block every block_size tokens, and when none is left the newest running sequence is preempted by
recompute: its blocks are freed and it goes back to the FRONT of the waiting queue with the tokens it has
generated, to be prefilled again (prefix caching usually finds most of its blocks still there).

A waiting prompt that shares at least MIN_SHARED_BLOCKS leading blocks with a prompt being prefilled right
now (n > 1 samples of one prompt, RL's groups, a long system prompt arriving in a burst) waits one step: by
then those blocks are written and named, so it shares them instead of computing them a second time. It
keeps its seat and the blocks it will need meanwhile; later requests may go ahead only with what is left.
"""
import itertools
from collections import deque

from fastchat_core.kvcache import BlockManager
from fastchat_core.sampler import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
PENDING = -1   # stands in for a token that was sampled on the GPU but has not reached the host yet
MIN_SHARED_BLOCKS = 4   # below this, computing the blocks again costs less than a step of waiting

_seq_ids = itertools.count()


class Sequence:
    """One request's tokens and progress. token_ids = prompt + output; K/V exist for token_ids[:num_computed]."""

    def __init__(self, request_id, prompt_ids: list[int], params: SamplingParams):
        self.seq_id = next(_seq_ids)          # the BlockManager's key; request ids are the user's
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = WAITING
        self.num_computed = 0
        self.prefill_len = 0                  # tokens to compute before the next sample (set on admission)
        self.num_cached_tokens = None         # prompt tokens found in the prefix cache on first admission
        self.forced = deque()                 # tool output to paste in instead of sampling
        self.tool = None                      # a running sandboxed tool call (Future of its output text)
        self.finish_reason = None
        # detokenization state (engine): text of output_ids[:read_offset], and how much of it was sent
        self.text = ""
        self.read_offset = 0
        self.sent_chars = 0
        self.arrival_time = self.last_token_time = None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def waits_on_tool(self) -> bool:
        """Nothing to decode until the tool's output arrives (it is pasted, not sampled)."""
        return self.tool is not None and not self.forced

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_len


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({max_num_seqs}): every running sequence decodes one token per step")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []    # admission order: the last one is the first to be preempted
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self):
        """Plan one step: (decodes, prefills, copies). decodes: sequences whose newest token gets a slot now;
        prefills: (seq, n) to compute token_ids[seq.num_computed:+n]; copies: (src, dst) blocks to copy first."""
        budget, decodes, prefills, copies = self.max_num_batched_tokens, [], [], []
        for seq in list(self.running):
            if seq.status != RUNNING or seq.is_prefilling or seq.waits_on_tool:   # preempted, prefilling, paused
                continue
            if seq.num_output_tokens >= seq.params.max_tokens:   # its pending token is its last
                continue
            if not self._make_room(seq):
                continue
            copy = self.bm.append_slot(seq)
            if copy:
                copies.append(copy)
            decodes.append(seq)
            budget -= 1
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.prefill_len - seq.num_computed, budget)
                prefills.append((seq, n))
                budget -= n
        # prompts whose first block is being computed this step, by that block's name
        in_flight = {h: seq for seq, _ in prefills if (h := self.bm.first_block_hash(seq.token_ids)) is not None}
        deferred, reserved = [], 0   # held back a step, and the blocks they will still need of their own
        while self.waiting and budget > 0 and len(self.running) + len(deferred) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PENDING:
                break   # preempted with a token on the way: next step
            h = self.bm.first_block_hash(seq.token_ids)
            shared = self._shared_blocks(seq, in_flight[h]) if h in in_flight and not self.bm.is_named(h) else 0
            if shared >= MIN_SHARED_BLOCKS:
                deferred.append(self.waiting.popleft())
                reserved += -(-len(seq.token_ids) // self.bm.block_size) - shared
                continue
            if not self.bm.can_allocate(seq, reserved):
                break   # FIFO for memory: nobody overtakes a head that does not fit
            self.waiting.popleft()
            if h is not None:
                in_flight.setdefault(h, seq)
            cached = self.bm.allocate(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = cached
            seq.num_computed, seq.prefill_len, seq.status = cached, len(seq.token_ids), RUNNING
            self.running.append(seq)
            n = min(seq.prefill_len - cached, budget)
            prefills.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))   # back at the front, in their order
        return decodes, prefills, copies

    def _shared_blocks(self, seq: Sequence, owner: Sequence) -> int:
        """Leading full blocks of seq's prompt (before its last token) equal to owner's: what it can share."""
        bs, a, b = self.bm.block_size, seq.token_ids, owner.token_ids
        n = 0
        while (n + 1) * bs <= min(len(a) - 1, len(b)) and a[n * bs:(n + 1) * bs] == b[n * bs:(n + 1) * bs]:
            n += 1
        return n

    def _make_room(self, seq: Sequence) -> bool:
        """Preempt the newest running sequences until `seq` can take its next slot; False if `seq` itself went."""
        while not self.bm.can_append(seq):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence):
        self.bm.free(seq)
        self.running.remove(seq)
        seq.status, seq.num_computed, seq.prefill_len = WAITING, 0, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str):
        """Release a sequence for good (done or aborted), wherever it is."""
        self.bm.free(seq)
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = FINISHED, reason

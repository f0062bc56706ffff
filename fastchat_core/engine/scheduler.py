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

A prompt being scored (prompt logprobs) needs the logits of every position, so it shares no cached prefix
(its K/V would be there, its logits not) and its chunks are cut so that one step returns at most
MAX_SCORED_TOKENS rows of logits: those are (rows, vocabulary) float32, 256 MiB at 1024 x 65,536.
"""
from collections import deque

from fastchat_core.engine.block_manager import BlockManager
from fastchat_core.engine.sequence import FINISHED, PENDING, RUNNING, WAITING, Sequence

MIN_SHARED_BLOCKS = 4   # below this, computing the blocks again costs less than a step of waiting
MAX_SCORED_TOKENS = 1024   # prompt positions whose logits one step returns (prompt logprobs)


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
        """Plan one step: (decodes, prefills). decodes: sequences whose newest token gets a slot now;
        prefills: (seq, n) to compute token_ids[seq.num_computed:+n]."""
        budget, decodes, prefills = self.max_num_batched_tokens, [], []
        for seq in list(self.running):
            if seq.status != RUNNING or seq.is_prefilling or seq.waits_on_tool:   # preempted, prefilling, paused
                continue
            if seq.num_output_tokens >= seq.params.max_tokens:   # its pending token is its last
                continue
            if not self._make_room(seq):
                continue
            self.bm.append_slot(seq)
            decodes.append(seq)
            budget -= 1
        scored = MAX_SCORED_TOKENS   # what is left of this step's rows of prompt logits
        for seq in self.running:
            n = min(seq.prefill_len - seq.num_computed, budget, scored if seq.scores_prompt else budget)
            if seq.is_prefilling and n > 0:
                prefills.append((seq, n))
                budget -= n
                scored -= n * seq.scores_prompt
        # prompts whose first block is being computed this step, by that block's name
        in_flight = {h: seq for seq, _ in prefills if (h := self.bm.first_block_hash(seq.token_ids)) is not None}
        deferred, reserved = [], 0   # held back a step, and the blocks they will still need of their own
        while self.waiting and budget > 0 and len(self.running) + len(deferred) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PENDING:
                break   # preempted with a token on the way: next step
            if seq.scores_prompt and not scored:
                break   # this step returns all the prompt logits it may
            h = None if seq.scores_prompt else self.bm.first_block_hash(seq.token_ids)
            shared = self._shared_blocks(seq, in_flight[h]) if h in in_flight and not self.bm.is_named(h) else 0
            if shared >= MIN_SHARED_BLOCKS:
                deferred.append(self.waiting.popleft())
                reserved += -(-len(seq.token_ids) // self.bm.block_size) - shared
                continue
            if not self.bm.can_allocate(seq, reserved, share=not seq.scores_prompt):
                break   # FIFO for memory: nobody overtakes a head that does not fit
            self.waiting.popleft()
            if h is not None:
                in_flight.setdefault(h, seq)
            cached = self.bm.allocate(seq, share=not seq.scores_prompt)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = cached
            seq.num_computed, seq.prefill_len, seq.status = cached, len(seq.token_ids), RUNNING
            self.running.append(seq)
            n = min(seq.prefill_len - cached, budget, scored if seq.scores_prompt else budget)
            prefills.append((seq, n))
            budget -= n
            scored -= n * seq.scores_prompt
        self.waiting.extendleft(reversed(deferred))   # back at the front, in their order
        return decodes, prefills

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

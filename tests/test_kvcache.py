"""BlockManager: allocation, prefix sharing (n > 1 copies of a prompt included), LRU eviction, and a randomized
invariant check (no block is ever written while shared).

A fake KV cache (one int per slot, holding the token whose K/V would be there) lets the tests check what
really matters: every sequence reads back its own tokens, whatever blocks it shares or inherits.
"""
import random
from dataclasses import dataclass, field

import pytest

from fastchat_core.engine.block_manager import BlockManager, num_blocks_for_memory

BS = 4


@dataclass
class Seq:
    seq_id: int
    token_ids: list[int] = field(default_factory=list)


class FakeCache:
    """Stands in for the engine: writes tokens into slots as a forward pass would write K/V."""

    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.slots = [-1] * (bm.num_blocks * bm.block_size)

    def write(self, seq, start, end):
        for pos, slot in zip(range(start, end), self.bm.slot_mapping(seq, start, end)):
            block = slot // self.bm.block_size
            assert self.bm.ref_counts[block] == 1, "wrote into a shared block"
            assert self.bm.block_hashes[block] is None, "wrote into a named (cached) block"
            self.slots[slot] = seq.token_ids[pos]

    def prefill(self, seq):
        cached = self.bm.allocate(seq)
        self.write(seq, cached, len(seq.token_ids))
        self.bm.mark_computed(seq, len(seq.token_ids))
        return cached

    def decode(self, seq, token):
        seq.token_ids.append(token)
        self.bm.append_slot(seq)
        n = len(seq.token_ids)
        self.write(seq, n - 1, n)

    def read(self, seq, upto):
        return [self.slots[s] for s in self.bm.slot_mapping(seq, 0, upto)]


def check_invariants(bm: BlockManager, seqs=()):
    free, cached = set(bm.free_ids), set(bm.cached)
    assert len(free) == len(bm.free_ids) and not free & cached
    holders = [0] * bm.num_blocks
    for table in bm.tables.values():
        assert len(set(table.blocks)) == len(table.blocks)
        assert len(table.blocks) == -(-table.num_tokens // bm.block_size)
        for b in table.blocks:
            holders[b] += 1
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == holders[b]
        in_use = holders[b] > 0
        assert (b in free) + (b in cached) + in_use == 1, f"block {b} in several places or none"
        if b in free:
            assert bm.block_hashes[b] is None
        if b in cached:
            assert bm.block_hashes[b] is not None
    assert {h: b for b, h in enumerate(bm.block_hashes) if h is not None} == bm.hash_to_block
    assert bm.num_free_blocks == len(free) + len(cached)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks


def test_allocate_free_returns_every_block():
    bm = BlockManager(8, BS)
    seqs = [Seq(i, list(range(100 * i, 100 * i + n))) for i, n in enumerate([1, 4, 5, 9])]
    for s in seqs:
        assert bm.can_allocate(s)
        assert bm.allocate(s) == 0
    assert bm.num_used_blocks == 1 + 1 + 2 + 3
    assert [len(bm.block_table(s)) for s in seqs] == [1, 1, 2, 3]
    check_invariants(bm)
    for s in seqs:
        bm.free(s)
    bm.free(seqs[0])  # freeing twice (e.g. abort after finish) is harmless
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    check_invariants(bm)


def test_prefix_hit_shares_full_blocks_only():
    bm = BlockManager(16, BS)
    cache = FakeCache(bm)
    a = Seq(0, list(range(10)))            # blocks [0..3] [4..7] [8 9]
    assert cache.prefill(a) == 0
    b = Seq(1, list(range(10)) + [42])     # same 2 full blocks, different tail
    assert cache.prefill(b) == 2 * BS
    assert bm.block_table(b)[:2] == bm.block_table(a)[:2]
    assert bm.block_table(b)[2] != bm.block_table(a)[2]   # the partial block is never shared
    assert [bm.ref_counts[x] for x in bm.block_table(a)] == [2, 2, 1]
    assert cache.read(b, 11) == b.token_ids
    c = Seq(2, [0, 1, 2, 3, 99, 5, 6, 7, 8])  # diverges inside block 1: only block 0 matches
    assert cache.prefill(c) == BS
    d = Seq(3, [7] + list(range(10)))     # same tokens after another prefix: no hit
    assert cache.prefill(d) == 0
    check_invariants(bm)


def test_full_hit_still_recomputes_last_token():
    bm = BlockManager(8, BS)
    cache = FakeCache(bm)
    a = Seq(0, list(range(8)))
    cache.prefill(a)
    b = Seq(1, list(range(8)))   # prompt equals two cached full blocks
    assert cache.prefill(b) == BS  # the last block is recomputed so the model has logits to sample from
    assert cache.read(b, 8) == b.token_ids
    check_invariants(bm)


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    cache = FakeCache(bm)
    cache.prefill(Seq(0, list(range(9))))
    assert cache.prefill(Seq(1, list(range(9)))) == 0
    assert bm.hash_to_block == {}
    check_invariants(bm)


def test_freed_full_blocks_stay_cached_and_are_reused():
    bm = BlockManager(8, BS)
    cache = FakeCache(bm)
    a = Seq(0, list(range(9)))
    cache.prefill(a)
    table = bm.block_table(a)
    bm.free(a)
    assert bm.num_free_blocks == 8                          # cached blocks count as free
    assert set(bm.cached) == set(table[:2])                 # full blocks keep their content
    assert table[2] in bm.free_ids                          # the partial one does not
    b = Seq(1, list(range(9)) + [5])
    assert cache.prefill(b) == 2 * BS
    assert bm.block_table(b)[:2] == table[:2] and not bm.cached
    assert cache.read(b, 10) == b.token_ids
    check_invariants(bm)


def test_unwritten_blocks_are_never_shared():
    """A prefill preempted before its K/V was written must not leave named blocks behind."""
    bm = BlockManager(8, BS)
    a = Seq(0, list(range(9)))
    bm.allocate(a)
    assert bm.allocate(Seq(1, list(range(9)))) == 0
    bm.mark_computed(a, 5)   # a chunked prefill wrote the first 5 tokens: block 0 only
    assert bm.allocate(Seq(2, list(range(9)))) == BS
    bm.free(a)
    assert list(bm.cached) == []  # block 0 is still held by seq 2; block 1 was never named
    check_invariants(bm)


def test_lru_eviction_order():
    bm = BlockManager(6, BS)
    cache = FakeCache(bm)
    old = Seq(0, [1] * 8 + [0])       # two full blocks + one partial
    new = Seq(1, [2] * 8 + [0])
    cache.prefill(old)
    cache.prefill(new)
    old_t, new_t = bm.block_table(old), bm.block_table(new)
    bm.free(old)
    bm.free(new)
    # LRU order: old before new; within a sequence its tail block before its head block.
    assert list(bm.cached) == [old_t[1], old_t[0], new_t[1], new_t[0]]
    x = Seq(2, list(range(100, 117)))  # 5 blocks: 2 never-named free blocks first, then 3 evictions
    assert bm.can_allocate(x)
    cache.prefill(x)
    assert bm.block_table(x)[2:] == [old_t[1], old_t[0], new_t[1]]
    assert list(bm.cached) == [new_t[0]]
    bm.free(x)
    assert cache.prefill(Seq(3, [2] * 8 + [7])) == BS   # new's head block survived
    check_invariants(bm)


def test_can_allocate_counts_hits_on_cached_blocks():
    bm = BlockManager(4, BS)
    cache = FakeCache(bm)
    a = Seq(0, list(range(9)))
    cache.prefill(a)
    bm.free(a)                                    # 2 cached + 2 free
    other = Seq(1, [50] * 5)
    cache.prefill(other)                          # takes the 2 free blocks
    x = Seq(2, list(range(9)) + [1, 2, 3])        # 2 hits on cached blocks + 1 new block
    assert not bm.can_allocate(x)                 # the only free blocks are the ones it would hit
    bm.free(other)
    assert bm.can_allocate(x)
    assert cache.prefill(x) == 2 * BS
    assert not bm.can_allocate(Seq(3, [9] * 9))   # 3 blocks needed, 1 left
    with pytest.raises(ValueError, match="--kv-fraction"):
        bm.can_allocate(Seq(4, list(range(17))))  # more than the whole pool: can never fit
    check_invariants(bm)


def test_append_across_block_boundaries_and_slot_mapping():
    bm = BlockManager(8, BS)
    cache = FakeCache(bm)
    s = Seq(0, [5, 6, 7])
    cache.prefill(s)
    for t in range(10):
        assert bm.can_append(Seq(0, s.token_ids + [t]))
        cache.decode(s, t)
        n = len(s.token_ids)
        assert len(bm.block_table(s)) == -(-n // BS)
        check_invariants(bm)
    table = bm.block_table(s)
    assert bm.slot_mapping(s, 0, 13) == [table[p // BS] * BS + p % BS for p in range(13)]
    assert bm.slot_mapping(s, 5, 5) == []
    assert cache.read(s, 13) == s.token_ids
    with pytest.raises(IndexError):
        bm.slot_mapping(s, 0, 14)
    with pytest.raises(ValueError, match="exactly one"):
        s.token_ids += [1, 2]
        bm.append_slot(s)


def test_decoded_blocks_become_shareable():
    bm = BlockManager(8, BS)
    cache = FakeCache(bm)
    s = Seq(0, [1, 2, 3])
    cache.prefill(s)
    for t in [4, 5, 6]:
        cache.decode(s, t)   # token 4 fills block 0; it is named once the next token arrives
    follow_up = Seq(1, [1, 2, 3, 4, 5, 6, 9])   # e.g. the next turn of a chat
    assert cache.prefill(follow_up) == BS
    assert cache.read(follow_up, 7) == follow_up.token_ids


def test_append_out_of_blocks_is_normal_flow():
    bm = BlockManager(2, BS)
    cache = FakeCache(bm)
    a, b = Seq(0, [1, 2, 3, 4]), Seq(1, [5, 6, 7, 8])
    cache.prefill(a)
    cache.prefill(b)
    a.token_ids.append(9)
    assert not bm.can_append(a)     # the scheduler preempts b ...
    bm.free(b)
    assert bm.can_append(a)         # ... and a goes on
    a.token_ids.pop()
    cache.decode(a, 9)
    check_invariants(bm)


def test_randomized_stress():
    rng = random.Random(0)
    bm = BlockManager(12, BS)
    cache = FakeCache(bm)
    running, next_id, shared = {}, 0, 0
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(6)]  # shared prefixes
    for step in range(1500):
        op = rng.random()
        if op < 0.3:
            s = Seq(next_id, list(rng.choice(prompts)) + [rng.randrange(3) for _ in range(rng.randrange(3))])
            next_id += 1
            if bm.can_allocate(s):
                cached = bm.allocate(s)
                assert cached % BS == 0 and cached < len(s.token_ids)
                if rng.random() < 0.2:       # preempted before its prefill ran
                    bm.free(s)
                else:
                    cache.write(s, cached, len(s.token_ids))
                    bm.mark_computed(s, len(s.token_ids))
                    running[s.seq_id] = s
        elif op < 0.65 and running:
            s = running[rng.choice(list(running))]
            s.token_ids.append(rng.randrange(3))
            if bm.can_append(s):
                cache.decode(s, s.token_ids.pop())
            else:
                bm.free(s)                   # preempted: would be recomputed later
                del running[s.seq_id]
        elif op < 0.75 and running:   # another sample of a running sequence's tokens (n > 1): shares its blocks
            parent = running[rng.choice(list(running))]
            child = Seq(next_id, list(parent.token_ids))
            next_id += 1
            if bm.can_allocate(child):
                shared += cache.prefill(child)
                running[child.seq_id] = child
        elif running:
            bm.free(running.pop(rng.choice(list(running))))
        check_invariants(bm)
        for s in running.values():
            assert cache.read(s, len(s.token_ids)) == s.token_ids, f"step {step}: seq {s.seq_id} reads wrong K/V"
    for s in running.values():
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
    check_invariants(bm)
    assert shared > 0   # the copies did share


def test_num_blocks_for_memory():
    # 2 (K,V) * 4 layers * 16 tokens * 2 heads * 64 dims * 2 bytes = 32 KiB per block
    assert num_blocks_for_memory(2**30, 0.5, 4, 2, 64, 16, 2) == 2**29 // (32 * 1024)
    with pytest.raises(ValueError, match="--kv-fraction"):
        num_blocks_for_memory(10_000, 0.9, 4, 2, 64, 16, 2)
    with pytest.raises(ValueError, match="--kv-fraction"):
        num_blocks_for_memory(2**30, 1.5, 4, 2, 64, 16, 2)


def test_unappend_slot_returns_a_block_opened_for_that_slot():
    bm = BlockManager(4, BS)
    seq = Seq(0, list(range(BS)))
    bm.allocate(seq)
    seq.token_ids.append(99)
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert bm.num_free_blocks == 2 and len(bm.block_table(seq)) == 2   # the slot opened a second block
    bm.unappend_slot(seq)
    seq.token_ids.pop()
    assert bm.num_free_blocks == 3 and len(bm.block_table(seq)) == 1
    seq.token_ids.append(7)
    bm.append_slot(seq)                                     # reserve for 7: opens a block again
    bm.unappend_slot(seq)                                   # and back
    assert bm.num_free_blocks == 3
    bm.append_slot(seq)
    seq.token_ids.append(9)
    bm.append_slot(seq)                                     # the second slot of the open block...
    bm.unappend_slot(seq)                                   # ...keeps the block when taken back
    assert bm.num_free_blocks == 2 and len(bm.block_table(seq)) == 2
    bm.free(seq)
    assert bm.num_free_blocks == 4


def test_first_block_hash_and_reset():
    bm = BlockManager(8, block_size=4)
    assert bm.first_block_hash([1, 2, 3]) is None             # not a full block yet
    h = bm.first_block_hash([1, 2, 3, 4])
    assert bm.first_block_hash([1, 2, 3, 4, 5]) == h
    assert h is not None and not bm.is_named(h)
    assert BlockManager(8, 4, enable_prefix_caching=False).first_block_hash([1, 2, 3, 4, 5]) is None
    s = Seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(s)
    bm.mark_computed(s, 9)
    assert bm.is_named(h)
    with pytest.raises(RuntimeError, match="between generations"):
        bm.reset_prefix_cache()
    bm.free(s)
    assert len(bm.cached) == 2
    bm.reset_prefix_cache()
    assert not bm.is_named(h) and not bm.cached and bm.num_free_blocks == 8
    assert bm.allocate(Seq(1, [1, 2, 3, 4, 5, 6, 7, 8, 9])) == 0

"""Bookkeeping for the paged KV cache: which physical block holds which sequence's keys and values.

The GPU tensors live in the model runner; this module only hands out block ids. The pool is `num_blocks` blocks
of `block_size` token slots. Every sequence owns a block table (its logical block i -> a physical block id),
kept here keyed by `seq.seq_id`, so the engine holds no cache state of its own and a block's reference
count is always exactly the number of tables that contain it.

Prefix caching: a FULL block is named by a hash chain, hash_i = blake2b(hash_{i-1} || token ids of block i),
so a name covers the block's tokens and everything before them (the same tokens after another prefix are
different K/V). A new sequence whose prompt starts with named blocks shares them and prefills only the rest.
That is also how n > 1 copies of one prompt share it (the scheduler holds a copy back a step until its
first blocks are named). Only full blocks are ever shared, and a sequence writes only into its last, partly
filled block, which no other table holds: no block is ever written while shared, so nothing is copied.
blake2b (128-bit) rather than Python's `hash`: a collision would silently reuse wrong K/V, and a 64-bit
hash of attacker-chosen prompts is too small for that; it is also stable across processes.

A block is named only once its K/V has been written (see `append_slot` and `mark_computed`): naming it at
reservation time would let another sequence reuse a block that a chunked or preempted prefill never filled.

Each physical block is in exactly one of three states:
  free     ref 0, no name; in `free_ids`
  cached   ref 0, named (content still valid); in `cached`, least recently used first, evicted on demand
  in use   ref >= 1; in that many block tables
"""
import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Protocol


class Sequence(Protocol):
    """What the manager reads from the engine's sequence object."""
    seq_id: int
    token_ids: list[int]   # prompt + generated tokens so far


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)   # physical block ids, in token order
    num_tokens: int = 0                                # tokens that have a reserved slot
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each leading full block already named


def block_hash(prev: bytes, tokens) -> bytes:
    """Name of a full block: depends on its tokens and, through `prev`, on every token before it."""
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Allocates KV-cache blocks to sequences, with reference counts, prefix sharing and LRU eviction.

    The engine's contract, per step:
      admit:   `can_allocate(seq)` then `allocate(seq)` -> tokens already cached; prefill the rest
               (in chunks if it likes), calling `mark_computed(seq, n)` after each chunk is written.
      decode:  append the sampled token to seq.token_ids, `can_append(seq)` then `append_slot(seq)`.
      finish / preempt / abort: `free(seq)`.
    When `can_allocate`/`can_append` say False the scheduler should preempt someone: running out of blocks
    is normal flow, never an exception.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_ids = deque(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()   # evictable named blocks, oldest first
        self.tables: dict[int, _Table] = {}

    # ---- pool state -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: never-named ones plus cached ones it may evict."""
        return len(self.free_ids) + len(self.cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    def block_table(self, seq: Sequence) -> list[int]:
        """A copy of the sequence's physical block ids, for the attention kernel's block_tables."""
        return list(self.tables[seq.seq_id].blocks)

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Flat cache slots (block_id * block_size + offset) for token positions start..end-1."""
        table = self.tables[seq.seq_id]
        if not 0 <= start <= end <= table.num_tokens:
            raise IndexError(f"positions {start}..{end} outside the {table.num_tokens} reserved for seq {seq.seq_id}")
        bs = self.block_size
        return [table.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- admission --------------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, reserved: int = 0, share: bool = True) -> bool:
        """Whether blocks for all of the sequence's current tokens can be had now (prefix hits counted),
        leaving `reserved` free blocks to others (the scheduler's sequences held back a step). share=False:
        as `allocate(seq, share=False)` would take them, without the prefix cache."""
        needed = self._blocks_for(len(seq.token_ids))
        hits = self._prefix_hits(seq.token_ids)[0] if share else []
        reclaimed = sum(self.ref_counts[b] == 0 for b in hits)   # cached hits stop being free once shared
        return needed - len(hits) <= self.num_free_blocks - reclaimed - reserved

    def allocate(self, seq: Sequence, share: bool = True) -> int:
        """Reserve blocks for all of the sequence's current tokens; returns how many are already cached.

        The cached count is a multiple of block_size and always less than the number of tokens: the last
        prompt token is recomputed even on a full hit, since its logits are needed to sample. share=False:
        fresh blocks for every token, whatever is cached (a prompt being scored needs the logits of each).
        """
        if seq.seq_id in self.tables:
            raise ValueError(f"seq {seq.seq_id} already has blocks; free it before allocating again")
        if not self.can_allocate(seq, share=share):
            raise RuntimeError("out of KV blocks: check can_allocate(seq) first and preempt when it is False")
        hits, hashes = self._prefix_hits(seq.token_ids) if share else ([], [])
        table = _Table(hashes=hashes)
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.cached[b]
            self.ref_counts[b] += 1
            table.blocks.append(b)
        while len(table.blocks) < self._blocks_for(len(seq.token_ids)):
            table.blocks.append(self._take_block())
        table.num_tokens = len(seq.token_ids)
        self.tables[seq.seq_id] = table
        return len(hits) * self.block_size

    def first_block_hash(self, token_ids: list[int]) -> bytes | None:
        """Name of the sequence's first block (None while it is not full, or with prefix caching off);
        `is_named` says whether some block holds its K/V already."""
        if not self.enable_prefix_caching or len(token_ids) < self.block_size:
            return None
        return block_hash(b"", token_ids[:self.block_size])

    def is_named(self, h: bytes) -> bool:
        return h in self.hash_to_block

    def reset_prefix_cache(self) -> None:
        """Forget every block's name, e.g. after the model's weights changed (RL): cached K/V came from the
        old weights. Only between generations: a running sequence would name its blocks again."""
        if self.tables:
            raise RuntimeError(f"{len(self.tables)} sequences still hold KV blocks: reset the prefix cache "
                               "between generations, when none is in flight")
        self.free_ids.extend(self.cached)
        self.cached.clear()
        self.hash_to_block.clear()
        self.block_hashes = [None] * self.num_blocks

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """The K/V of the sequence's first `num_tokens` tokens is now written: name its full blocks.

        Call after each prefill chunk so other requests can share the prompt while this one still runs.
        Optional for correctness: `append_slot` names everything before the newest token anyway.
        """
        table = self.tables[seq.seq_id]
        if num_tokens > table.num_tokens:
            raise ValueError(f"seq {seq.seq_id}: {num_tokens} tokens computed but only {table.num_tokens} reserved")
        self._name_full_blocks(table, seq.token_ids, num_tokens)

    # ---- decode -----------------------------------------------------------------------------------

    def can_append(self, seq: Sequence) -> bool:
        """Whether the slot for the sequence's newest token can be reserved now."""
        table = self.tables[seq.seq_id]
        self._check_one_more(seq, table)
        return self.num_free_blocks >= (table.num_tokens % self.block_size == 0)

    def append_slot(self, seq: Sequence) -> None:
        """Reserve the slot for the newest token of seq.token_ids (one more than last time); opens a new block
        at a block boundary. Every token but the newest has had its K/V written by now, so full blocks before
        it get named.
        """
        table = self.tables[seq.seq_id]
        self._check_one_more(seq, table)
        if table.num_tokens % self.block_size == 0:
            if not self.num_free_blocks:
                raise RuntimeError("out of KV blocks: check can_append(seq) first and preempt when it is False")
            table.blocks.append(self._take_block())
        table.num_tokens += 1
        self._name_full_blocks(table, seq.token_ids, table.num_tokens - 1)

    def unappend_slot(self, seq: Sequence) -> None:
        """Take back the slot the last `append_slot` reserved (the engine computed a token it must discard).
        A block opened for that slot alone goes back to the free list; it holds nothing named."""
        table = self.tables[seq.seq_id]
        table.num_tokens -= 1
        if table.num_tokens % self.block_size == 0:
            b = table.blocks.pop()
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_ids.append(b)

    # ---- release ----------------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (no-op if it has none, e.g. aborted while waiting).

        Named blocks whose count drops to 0 stay cached; they are released tail first, so under pressure
        a prompt's last blocks are evicted before its first ones (a chain is useless without its head).
        """
        table = self.tables.pop(seq.seq_id, None)
        if table is None:
            return
        for b in reversed(table.blocks):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                if self.block_hashes[b] is None:
                    self.free_ids.append(b)
                else:
                    self.cached[b] = None

    # ---- internals --------------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        needed = -(-num_tokens // self.block_size)
        if needed > self.num_blocks:
            raise ValueError(
                f"a sequence of {num_tokens} tokens needs {needed} KV blocks but the whole cache has "
                f"{self.num_blocks}: give the cache more blocks (num_blocks, or --kv-fraction) or lower max_tokens")
        return needed

    def _check_one_more(self, seq: Sequence, table: _Table):
        if len(seq.token_ids) != table.num_tokens + 1:
            raise ValueError(f"seq {seq.seq_id} has {len(seq.token_ids)} tokens, {table.num_tokens} reserved: "
                             "append_slot reserves exactly one new token per call")
        self._blocks_for(len(seq.token_ids))

    def _prefix_hits(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Cached blocks matching the leading full blocks, stopping before the last token, and their hashes."""
        if not self.enable_prefix_caching:
            return [], []
        bs, hits, hashes, prev = self.block_size, [], [], b""
        for i in range((len(token_ids) - 1) // bs):
            prev = block_hash(prev, token_ids[i * bs:(i + 1) * bs])
            b = self.hash_to_block.get(prev)
            if b is None:
                break
            hits.append(b)
            hashes.append(prev)
        return hits, hashes

    def _name_full_blocks(self, table: _Table, token_ids: list[int], num_computed: int):
        """Register the hash of every full block within the first `num_computed` tokens not yet named."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(table.hashes), num_computed // bs):
            h = block_hash(table.hashes[-1] if table.hashes else b"", token_ids[i * bs:(i + 1) * bs])
            table.hashes.append(h)
            b = table.blocks[i]
            # Identical content may already be cached in another block (e.g. two equal prompts prefilled
            # side by side): keep the first; this one stays unnamed and goes back to the free list later.
            if h not in self.hash_to_block:
                self.hash_to_block[h] = b
                self.block_hashes[b] = h

    def _take_block(self) -> int:
        """A block for new content: a never-named one if any, else evict the least recently used cached one."""
        if self.free_ids:
            b = self.free_ids.popleft()
        else:
            b, _ = self.cached.popitem(last=False)
            del self.hash_to_block[self.block_hashes[b]]
            self.block_hashes[b] = None
        self.ref_counts[b] = 1
        return b


def num_blocks_for_memory(free_bytes: int, fraction: float, n_layers: int, n_kv_heads: int, head_dim: int,
                          block_size: int, dtype_bytes: int) -> int:
    """How many KV blocks fit in `fraction` of `free_bytes` (e.g. torch.cuda.mem_get_info()[0]).

    One block holds K and V for block_size tokens in every layer.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--kv-fraction must be in (0, 1], got {fraction}")
    block_bytes = 2 * n_layers * block_size * n_kv_heads * head_dim * dtype_bytes
    num = int(free_bytes * fraction) // block_bytes
    if num < 1:
        raise ValueError(
            f"no room for a single KV block ({block_bytes / 2**20:.1f} MiB) in {fraction:.0%} of "
            f"{free_bytes / 2**30:.2f} GiB free: raise --kv-fraction, or free GPU memory (other processes)")
    return num

"""The model runner: owns the KV cache tensors and runs the model's paged forward for a planned batch.

Decode (one new token per running sequence) has fixed shapes, so on the GPU it is replayed from a CUDA graph
captured per batch-size bucket; prefill (ragged, compute-bound) runs eagerly as one packed forward.
It reads the model through its engine interface only: config, forward_paged, qkv_parts (sizes), fuse_qkv
and qkv_version. A model with config.smear also gets each new token's predecessor (prev_ids).
"""
import itertools
import math

import torch

from fastchat_core.attention import PagedBatch
from fastchat_core.common import ConfigError
from fastchat_core.engine.block_manager import BlockManager, num_blocks_for_memory
from fastchat_core.engine.transfer import pinned, to_device


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph; a batch runs padded up to the next one. Steps of 16
    up to 256 (of 64 beyond) keep the padding small while the batch drains: with powers of two, 130
    sequences ran the GEMMs, norms and logits of 256."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(320, max_num_seqs, 64)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def num_kv_blocks(model, block_size: int, kv_fraction: float) -> int:
    """How many KV blocks to give the runner: on CUDA, kv_fraction of the free memory less the fused q/k/v
    copy the runner makes; 512 elsewhere."""
    p, cfg = next(model.parameters()), model.config
    if p.device.type != "cuda":
        return 512
    qkv = sum(w.nbytes for parts in model.qkv_parts() for w in parts)
    free = torch.cuda.mem_get_info(p.device)[0] - qkv
    return num_blocks_for_memory(free, kv_fraction, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, block_size,
                                 p.element_size())


class ModelRunner:
    """Owns the KV cache tensors and runs the model's paged forward for a planned batch."""

    def __init__(self, model, block_manager: BlockManager, max_num_seqs: int, max_model_len: int,
                 use_cuda_graphs: bool, compile_decode: bool = False):
        cfg, p = model.config, next(model.parameters())
        self.model, self.bm, self.device = model, block_manager, p.device
        if self.device.type == "cuda" and cfg.head_dim not in (64, 128):   # else the decode kernel fails in capture
            raise ConfigError(f"the engine's CUDA decode kernel supports head_dim 64 and 128, not {cfg.head_dim}: "
                              "use a model with one of those (the CPU engine takes any head_dim)")
        self.smear = cfg.smear
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
        # concatenation does (H200 profile at 232 sequences: 6.4 us each). The runner keeps the concatenated
        # copy (d20: 197 MB in bf16, 393 MB in fp32) and refreshes it in place (CUDA graphs read it where it
        # is) when the model's weights change: RL trains the model it samples from. (The prefix cache does
        # not follow them: after an update, Engine.reset_prefix_cache(), as RL's rollout does.)
        self.qkv_weights = model.fuse_qkv()
        self._qkv_version = model.qkv_version()
        self.graphs = {}   # batch size -> (graph, its output logits)
        if use_cuda_graphs and self.device.type == "cuda":
            self._capture_graphs(max_num_seqs)

    def refresh_weights(self, force=False):
        """Copy the q, k, v weights into their concatenation again if any changed since the last copy
        (force: regardless, e.g. after writes through `.data`, which the model's qkv_version cannot see)."""
        version = self.model.qkv_version()
        if force or version != self._qkv_version:
            self.model.fuse_qkv(out=self.qkv_weights)
            self._qkv_version = version

    def to_device(self, data, dtype) -> torch.Tensor:
        return to_device(self.device, data, dtype)

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

    def decode(self, seqs, fill=None) -> torch.Tensor:
        """Logits (B, V) for the newest token of each sequence, whose slot is already reserved. Under CUDA
        graphs they are a view of the one buffer every graph writes: use them (queue work on them) before
        the next decode, never keep them.
        fill = (rows, tokens, src): those rows' newest token is still PENDING on the host; it is tokens[src],
        a device tensor from the previous step's sampling."""
        ids = [s.token_ids[-1] for s in seqs]
        # the token before a PENDING one is known: it was put in place before this step was launched
        prev = [s.token_ids[-2] for s in seqs] if self.smear else None
        ctx = [len(s.token_ids) for s in seqs]
        pos = [n - 1 for n in ctx]
        slots = [self.bm.slot_mapping(s, n - 1, n)[0] for s, n in zip(seqs, ctx)]
        n = len(seqs)
        bs = min((b for b in self.graphs if b >= n), default=None)   # the smallest captured size that fits
        if bs is None:
            tables = self._tables(seqs).to(self.device, non_blocking=True)
            batch = PagedBatch(False, self.to_device(slots, torch.int64), tables, self.to_device(ctx, torch.int32))
            ids = self._fill(self.to_device(ids, torch.int64), fill)
            return self._decode_forward(ids, self.to_device(pos, torch.int64), batch, self.kv_caches,
                                        qkv_weights=self.qkv_weights,
                                        prev_ids=None if prev is None else self.to_device(prev, torch.int64))
        # Pad to the captured size: padding rows write nowhere (slot -1) and read one token of their first block.
        # Table entries past a row's context are never read, so only the columns in use are copied.
        pad = bs - n
        s_ids, s_pos, s_slots, s_ctx, s_tables, s_prev = self.static
        s_ids[:bs].copy_(pinned(self.device, ids + [0] * pad, torch.int64), non_blocking=True)
        if prev is not None:
            s_prev[:bs].copy_(pinned(self.device, prev + [0] * pad, torch.int64), non_blocking=True)
        self._fill(s_ids, fill)
        s_pos[:bs].copy_(pinned(self.device, pos + [0] * pad, torch.int64), non_blocking=True)
        s_slots[:bs].copy_(pinned(self.device, slots + [-1] * pad, torch.int64), non_blocking=True)
        s_ctx[:bs].copy_(pinned(self.device, ctx + [1] * pad, torch.int32), non_blocking=True)
        tables = self._tables(seqs)
        s_tables[:n, :tables.size(1)].copy_(tables, non_blocking=True)
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]

    def _fill(self, ids, fill):
        if fill is not None:
            rows, tokens, src = fill
            ids[self.to_device(rows, torch.int64)] = tokens[self.to_device(src, torch.int64)]
        return ids

    def prefill(self, chunks, num_logits) -> torch.Tensor:
        """One packed forward over chunks [(seq, n)]: computes token_ids[num_computed:+n] of each; returns the
        logits of each chunk's last num_logits[i] tokens, in chunk order (1 for a chunk that finishes its
        prefill, all n for a prompt being scored, else 0)."""
        ids, prev, pos, slots, qlens, ctxs = [], [], [], [], [], []
        for seq, n in chunks:
            c = seq.num_computed
            ids += seq.token_ids[c:c + n]
            prev += seq.token_ids[c - 1:c + n - 1] if c else [0, *seq.token_ids[:n - 1]]
            pos += range(c, c + n)
            slots += self.bm.slot_mapping(seq, c, c + n)
            qlens.append(n)
            ctxs.append(c + n)
        last = list(itertools.accumulate(qlens))
        rows = [r for end, k in zip(last, num_logits) for r in range(end - k, end)]
        batch = PagedBatch(True, self.to_device(slots, torch.int64),
                           self._tables([s for s, _ in chunks]).to(self.device, non_blocking=True),
                           self.to_device(ctxs, torch.int32), qlens, ctxs)
        return self.model.forward_paged(self.to_device(ids, torch.int64), self.to_device(pos, torch.int64), batch,
                                        self.kv_caches, logits_at=self.to_device(rows, torch.int64),
                                        qkv_weights=self.qkv_weights,
                                        prev_ids=self.to_device(prev, torch.int64) if self.smear else None)

    @torch.inference_mode()
    def _capture_graphs(self, max_num_seqs):
        """One CUDA graph per decode batch-size bucket, largest first so the smaller ones reuse its memory pool.
        The block-table width is fixed at the longest possible sequence. Every graph writes its logits into
        the same buffer (one per graph would hold ~0.6 GB at d20's vocabulary for 20 buckets)."""
        sizes = graph_batch_sizes(max_num_seqs)
        m = max_num_seqs
        i32, i64 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.int64, device=self.device)
        # ids, positions, slots, context lengths, block tables, previous ids (smear); every row starts as padding
        self.static = (torch.zeros(m, **i64), torch.zeros(m, **i64), torch.full((m,), -1, **i64), torch.ones(m, **i32),
                       torch.zeros(m, self.max_blocks, **i32), torch.zeros(m, **i64))
        s_ids, s_pos, s_slots, s_ctx, s_tables, s_prev = self.static
        logits = torch.empty(m, self.model.config.vocab_size, dtype=torch.float32, device=self.device)
        pool = None
        for bs in reversed(sizes):
            args = (s_ids[:bs], s_pos[:bs], PagedBatch(False, s_slots[:bs], s_tables[:bs], s_ctx[:bs]), self.kv_caches)
            # warm-up: compiling, Triton autotuning, cuBLAS set-up are not captured
            kwargs = dict(out=logits[:bs], qkv_weights=self.qkv_weights, prev_ids=s_prev[:bs] if self.smear else None)
            self._decode_forward(*args, **kwargs)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_forward(*args, **kwargs)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits[:bs])
        torch.cuda.synchronize(self.device)

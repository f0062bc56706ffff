"""Attention: training, and the engine's paged prefill and decode.

Training: on Hopper the cuDNN SDPA backend is the fastest attention we have (PERF.md: 541 TFLOP/s vs 294
for the flash backend), so it goes first in SDPA's priority list; flash-attn is used when a user has it
installed. Inputs are token-major (B, T, H, D) as the model produces them.
Engine: prefill runs every sequence of a step in one flash varlen call on CUDA in fp16/bf16 (elsewhere, and
under FASTCHAT_REFERENCE=1, SDPA per sequence); decode is csrc/'s paged kernel.

Sliding windows (the model's window_pattern option): a layer's `window` W lets each query see itself and the
W tokens before it (flash-attention's window_size=(W, 0)); None is full causal attention, today's path.
Training: flash-attn's own window when installed, else FlexAttention on CUDA (its block mask skips the
tiles outside the window, so a window of a quarter of T costs about a quarter; SDPA with a mask computes
every tile), else SDPA with an explicit mask (CPU, the reference). Engine: prefill passes the window to the
varlen kernel or to the per-sequence masks; decode gathers only the window's W + 1 slots per sequence and
runs SDPA on them (fixed shapes, so CUDA graphs capture it). A start offset in csrc/'s paged kernel would
skip that gather; not done.
"""
import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: never required
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Without gradients (evaluation, prefill) cuDNN goes last: it builds an execution plan for every new
# shape, and there almost every call has a new sequence length. Training has one shape, so it pays once.
# (Not measured apart yet: the d12 H200 run's CORE speed, ~90 ms an item, did not change with this.)
_SDPA_ORDER_NO_GRAD = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                       SDPBackend.MATH]


def causal_attention(q, k, v, window=None):
    """Causal self-attention over (B, T, H, D) tensors; k/v may have fewer heads (GQA/MQA). window: see the
    module's docstring."""
    if q.is_cuda and flash_attn_func is not None and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=True, window_size=(-1 if window is None else window, 0))
    if window is not None and window < q.size(1) - 1:
        return _sliding_window_attention(q, k, v, window)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)
    if q.is_cuda:
        with sdpa_kernel(_SDPA_ORDER if torch.is_grad_enabled() else _SDPA_ORDER_NO_GRAD, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)


def window_mask(q_pos, k_pos, window):
    """Which keys (at positions k_pos) each query (at q_pos) sees: causal, and within `window` tokens back."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff <= window)


def _sliding_window_attention(q, k, v, window):
    T, gqa = q.size(1), k.size(2) != q.size(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda and flex_attention is not None:
        y = _compiled_flex()(q, k, v, block_mask=_window_block_mask(T, window, q.device), enable_gqa=gqa)
    else:
        pos = torch.arange(T, device=q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(pos, pos, window), enable_gqa=gqa)
    return y.transpose(1, 2)


@functools.cache
def _compiled_flex():
    # eager flex_attention materializes the scores; compiled, it is one fused kernel that skips masked tiles
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _window_block_mask(T, window, device):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(mask_mod, None, None, T, T, device=device)


@dataclass
class PagedBatch:
    """What one engine step's attention needs to know about its packed batch of sequences.

    Prefill: each sequence contributes query_lens[i] new tokens (positions cached_lens[i] .. context_lens[i]-1)
    and attends to its cached prefix plus those tokens, causally. Decode: one new token per sequence.
    """
    is_prefill: bool
    slot_mapping: torch.Tensor        # (N,) int64: cache slot of each new token, -1 = do not store
    block_tables: torch.Tensor        # (B, max_blocks) int32
    context_lens: torch.Tensor        # (B,) int32: tokens in the cache after this step
    query_lens: list = field(default_factory=list)     # host ints, prefill only
    context_lens_host: list = field(default_factory=list)
    # built by the first layer (of each window) and shared by the rest: per-sequence causal masks (reference
    # path) or the varlen index tensors (kernel path)
    masks: dict = field(default_factory=dict)
    varlen: tuple | None = None

    def prefill_masks(self, device, window=None):
        """Query j of a sequence (absolute position n_ctx - n_new + j) sees keys 0 .. n_ctx - n_new + j (the
        last window + 1 of them with a window); None where nothing is cached and no window (plain causal)."""
        if window not in self.masks:
            self.masks[window] = [_prefill_mask(n_new, n_ctx, device, window)
                                  for n_new, n_ctx in zip(self.query_lens, self.context_lens_host)]
        return self.masks[window]

    def prefill_varlen(self, block_size):
        """(cu_seqlens_q, cu_seqlens_k, max_q, max_k, key_slots) for one varlen attention call over the packed
        batch. key_slots (total context, int64) are the cache slots of every sequence's context in order; None
        when nothing is cached, so that the new K/V are the whole context. Built on the device: no sync."""
        if self.varlen is None:
            device = self.block_tables.device
            pin = device.type == "cuda"   # pinned: the copies to the GPU do not block the host
            cu_q = torch.tensor([0, *itertools.accumulate(self.query_lens)], dtype=torch.int32, pin_memory=pin)
            cu_k = torch.tensor([0, *itertools.accumulate(self.context_lens_host)], dtype=torch.int32, pin_memory=pin)
            total = int(cu_k[-1])
            cu_q, cu_k = cu_q.to(device, non_blocking=True), cu_k.to(device, non_blocking=True)
            slots = None
            if self.query_lens != self.context_lens_host:
                seq = torch.repeat_interleave(torch.arange(len(self.query_lens), device=device),
                                              self.context_lens.long(), output_size=total)
                pos = torch.arange(total, device=device) - cu_k[seq]
                slots = self.block_tables[seq, pos // block_size].long() * block_size + pos % block_size
            self.varlen = (cu_q, cu_k, max(self.query_lens), max(self.context_lens_host), slots)
        return self.varlen


def _prefill_mask(n_new, n_ctx, device, window):
    if window is not None:
        return window_mask(torch.arange(n_ctx - n_new, n_ctx, device=device), torch.arange(n_ctx, device=device), window)
    if n_ctx == n_new:
        return None
    return torch.ones(n_new, n_ctx, dtype=torch.bool, device=device).tril(n_ctx - n_new)


def _varlen_kernel(q) -> bool:
    """Flash-attention's varlen kernel (bundled with PyTorch) takes the whole packed prefill in one call."""
    from fastchat_core import ops
    return (ops.use_kernel(q) and q.dtype in (torch.float16, torch.bfloat16) and q.size(-1) % 8 == 0
            and q.size(-1) <= 256 and _has_flash(q.device))


@functools.cache
def _has_flash(device) -> bool:
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def paged_attention_step(q, k, v, k_cache, v_cache, batch: PagedBatch, window=None):
    """q (N, Hq, D), k/v (N, Hk, D) of the new tokens -> attention output (N, Hq, D).

    New K/V go into the paged cache first (reshape_and_cache). Decode then reads the whole context from
    the cache with the paged decode kernel. Prefill on CUDA is one call of flash-attention's varlen kernel
    over every sequence (causal masks aligned bottom-right, so the new tokens of a sequence with a cached
    prefix see that prefix, gathered from the cache); elsewhere (and as its reference) SDPA per sequence.
    window: see the module's docstring.
    """
    from fastchat_core import ops
    ops.reshape_and_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    scale = q.size(-1) ** -0.5
    if not batch.is_prefill:
        if window is not None:
            return _decode_window(q, k_cache, v_cache, batch, window)
        return ops.paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    if _varlen_kernel(q):
        cu_q, cu_k, max_q, max_k, slots = batch.prefill_varlen(k_cache.size(1))
        if slots is not None:
            k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                       scale=scale, window_size_left=window,
                                                       window_size_right=None if window is None else 0)[0]
    return _prefill_per_sequence(q, k, v, k_cache, v_cache, batch, window)


def _decode_window(q, k_cache, v_cache, batch: PagedBatch, window):
    """Decode over the last window + 1 tokens of each context only, gathered from the cache: positions
    context_len - window - 1 .. context_len - 1, those before 0 masked out."""
    block_size = k_cache.size(1)
    pos = batch.context_lens.long()[:, None] + torch.arange(-window - 1, 0, device=q.device)   # (B, window + 1)
    valid = pos >= 0
    pos = pos.clamp(min=0)
    slots = batch.block_tables.gather(1, pos // block_size).long() * block_size + pos % block_size
    k, v = k_cache.flatten(0, 1)[slots].transpose(1, 2), v_cache.flatten(0, 1)[slots].transpose(1, 2)
    y = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :],
                                       enable_gqa=k.size(1) != q.size(1))
    return y.squeeze(2)


def _prefill_per_sequence(q, k, v, k_cache, v_cache, batch: PagedBatch, window=None):
    """The reference prefill: SDPA over each sequence's gathered context, with the causal mask offset by the
    length of its cached prefix (and cut to the window)."""
    out = torch.empty_like(q)
    block_size = k_cache.size(1)
    masks = batch.prefill_masks(q.device, window)
    start = 0
    with sdpa_kernel(_SDPA_ORDER_NO_GRAD, set_priority=True):   # once for all the sequences
        for i, (n_new, n_ctx) in enumerate(zip(batch.query_lens, batch.context_lens_host)):
            qi = q[start:start + n_new].transpose(0, 1)  # (Hq, n_new, D)
            if n_ctx == n_new:  # nothing cached: the new K/V are the whole context
                ki, vi = k[start:start + n_new], v[start:start + n_new]
            else:
                blocks = batch.block_tables[i, :-(-n_ctx // block_size)].long()
                ki = k_cache[blocks].flatten(0, 1)[:n_ctx]
                vi = v_cache[blocks].flatten(0, 1)[:n_ctx]
            ki, vi = ki.transpose(0, 1), vi.transpose(0, 1)
            mask = masks[i]
            y = F.scaled_dot_product_attention(qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                                               is_causal=mask is None, enable_gqa=ki.size(0) != qi.size(0))
            out[start:start + n_new] = y[0].transpose(0, 1)
            start += n_new
    return out

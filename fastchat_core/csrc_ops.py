"""Python face of the paged KV cache extension fastchat_core._C (csrc/).

The ops live in PyTorch's dispatcher as torch.ops.fastchat.* (CPU kernels always, CUDA kernels in CUDA builds).
This module loads them, registers their fake implementations (shapes only, so torch.compile can trace through
them), wraps them in plain functions, and keeps dense PyTorch references beside them for tests and benchmarks.

Cache layout, shared by keys and values: (num_blocks, block_size, num_kv_heads, head_dim), contiguous. A token's
slot is block * block_size + offset; block_tables (batch, max_blocks_per_seq) int32 lists each sequence's blocks.
"""
import math

import torch

try:
    from fastchat_core import _C  # noqa: F401  (loading the library registers torch.ops.fastchat.*)
    _BUILD_ERROR = None
except ImportError as e:  # the references below still work without it
    _BUILD_ERROR = e

HAS_EXTENSION = _BUILD_ERROR is None


def _require_extension():
    if _BUILD_ERROR is not None:
        raise RuntimeError(
            f"fastchat_core._C is not built ({_BUILD_ERROR}): reinstall with pip install --no-build-isolation -e ."
        ) from _BUILD_ERROR


if HAS_EXTENSION:

    @torch.library.register_fake("fastchat::reshape_and_cache")
    def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping):
        return None

    @torch.library.register_fake("fastchat::paged_attention")
    def _paged_attention_fake(query, key_cache, value_cache, block_tables, context_lens, scale):
        torch._check(query.size(1) % key_cache.size(2) == 0, lambda: "num_heads must be a multiple of num_kv_heads")
        return query.new_empty(query.shape)  # the kernels return a fresh contiguous (batch, num_heads, head_dim)

    @torch.library.register_fake("fastchat::copy_blocks")
    def _copy_blocks_fake(key_cache, value_cache, block_mapping):
        return None


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write key/value (N, num_kv_heads, head_dim) into the caches at slot_mapping (N,) int64/int32; -1 skips."""
    _require_extension()
    torch.ops.fastchat.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query, key_cache, value_cache, block_tables, context_lens, scale=None) -> torch.Tensor:
    """Decode attention: query (B, num_heads, head_dim), one token per sequence, over context_lens[b] cached
    tokens (the current one included) found through block_tables. GQA/MQA when num_heads > num_kv_heads.

    On CUDA, long contexts with few sequences are split across thread blocks (flash-decoding): how many
    blocks is decided from shapes alone, each sequence's partition length from its real context on the
    device, so a block table wider than the batch needs (a CUDA graph's) costs nothing. A context longer than
    its table row is an error on the CPU; on CUDA (which cannot check without a sync) it reads only the row.
    """
    _require_extension()
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    return torch.ops.fastchat.paged_attention(query, key_cache, value_cache, block_tables, context_lens, float(scale))


def copy_blocks(key_cache, value_cache, block_mapping) -> None:
    """Copy whole blocks in both caches; block_mapping (M, 2) rows of (src, dst). Destinations must be fresh,
    distinct blocks (neither a source nor repeated): the copies run in parallel. The CPU kernel checks this;
    the CUDA kernel cannot without a device sync."""
    _require_extension()
    torch.ops.fastchat.copy_blocks(key_cache, value_cache, block_mapping)


# Dense references: gather by index and do the math in plain PyTorch.

def reshape_and_cache_reference(key, value, key_cache, value_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key[keep]
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value[keep]


def copy_blocks_reference(key_cache, value_cache, block_mapping) -> None:
    src, dst = block_mapping.long().unbind(1)
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]


def paged_attention_reference(query, key_cache, value_cache, block_tables, context_lens, scale=None,
                              dtype=torch.float64) -> torch.Tensor:
    """paged_attention computed in `dtype` (float64 by default) by gathering each sequence's K/V rows through
    its block table and running plain softmax attention; returns (B, num_heads, head_dim) in `dtype`."""
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(batch, num_heads, head_dim, dtype=dtype, device=query.device)
    for b, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue  # an empty context attends to nothing
        blocks = block_tables[b, : math.ceil(n / block_size)].long()
        k = key_cache[blocks].flatten(0, 1)[:n].to(dtype).repeat_interleave(group, dim=1)  # (n, num_heads, dim)
        v = value_cache[blocks].flatten(0, 1)[:n].to(dtype).repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[b].to(dtype), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
    return out

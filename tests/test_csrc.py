"""fastchat_core._C, the paged KV cache ops, against dense references: CPU kernels always, CUDA kernels on a GPU.

Batches are ragged, block tables hold shuffled non-contiguous block ids, and everything a kernel must not read
(unused blocks, slots past a context's end) holds NaN, so a stray read shows up as NaN in the output.
"""
import math

import pytest
import torch
from conftest import tolerance

from fastchat_core import csrc_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_paged(context_lens, block_size, num_kv_heads, head_dim, dtype, device="cpu", seed=0, spare_blocks=3):
    """(key_cache, value_cache, block_tables, context_lens) for sequences of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(need) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(context_lens), max(max(need), 1)), -1, dtype=torch.int32)  # -1: never read
    caches = [torch.full((num_blocks * block_size, num_kv_heads, head_dim), float("nan")) for _ in range(2)]
    used = 0
    for b, (n, m) in enumerate(zip(context_lens, need)):
        tables[b, :m] = ids[used:used + m].int()
        used += m
        slots = (tables[b, :m].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        for cache in caches:
            cache[slots] = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    key_cache, value_cache = (c.view(num_blocks, block_size, num_kv_heads, head_dim).to(device, dtype) for c in caches)
    return key_cache, value_cache, tables.to(device), torch.tensor(context_lens, dtype=torch.int32, device=device)


def make_query(batch, num_heads, num_kv_heads, head_dim, dtype, device="cpu", seed=1):
    """Query as the model produces it: a non-contiguous view of a fused (batch, heads + 2 * kv heads, dim) qkv."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    return qkv[:, :num_heads]


def assert_close(actual, expected, dtype):
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# paged_attention on CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA 2, MQA
@pytest.mark.parametrize("block_size", [16, 8])
def test_paged_attention_matches_reference(dtype, head_dim, num_heads, num_kv_heads, block_size):
    lens = [1, block_size, block_size + 3, 37, 3 * block_size - 1, 2]
    key_cache, value_cache, tables, context_lens = make_paged(lens, block_size, num_kv_heads, head_dim, dtype)
    query = make_query(len(lens), num_heads, num_kv_heads, head_dim, dtype)
    scale = 0.7 / math.sqrt(head_dim)
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens, scale)
    assert out.shape == query.shape and out.dtype == dtype
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens, scale)
    assert_close(out, expected, dtype)


def test_paged_attention_default_scale_and_empty_context():
    lens = [5, 0, 20]  # a padded batch slot has context length 0 and must come out as zeros, not NaN
    key_cache, value_cache, tables, context_lens = make_paged(lens, 16, 2, 64, torch.float32)
    query = make_query(3, 4, 2, 64, torch.float32)
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens)
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, expected, torch.float32)


def test_cache_then_attend_matches_dense_attention():
    """End to end without the reference's gather: write dense per-sequence K/V through reshape_and_cache at the
    slots the block tables give, then compare paged_attention with softmax attention on the dense tensors."""
    block_size, num_heads, num_kv_heads, head_dim = 8, 6, 2, 64
    lens = [3, 17, 8, 30]
    gen = torch.Generator().manual_seed(2)
    key_cache, value_cache, tables, context_lens = make_paged(lens, block_size, num_kv_heads, head_dim, torch.float32)
    key_cache.fill_(float("nan"))
    value_cache.fill_(float("nan"))
    keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lens]
    values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lens]
    slots = torch.cat([tables[b, torch.arange(n) // block_size].long() * block_size + torch.arange(n) % block_size
                       for b, n in enumerate(lens)])
    csrc_ops.reshape_and_cache(torch.cat(keys), torch.cat(values), key_cache, value_cache, slots)
    query = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens)
    group = num_heads // num_kv_heads
    for b in range(len(lens)):
        k = keys[b].repeat_interleave(group, dim=1).double()
        v = values[b].repeat_interleave(group, dim=1).double()
        p = (torch.einsum("hd,nhd->hn", query[b].double(), k) / math.sqrt(head_dim)).softmax(-1)
        torch.testing.assert_close(out[b].double(), torch.einsum("hn,nhd->hd", p, v), rtol=1e-4, atol=1e-5)


# reshape_and_cache and copy_blocks on CPU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_reshape_and_cache(dtype, index_dtype):
    num_blocks, block_size, num_heads, num_kv_heads, head_dim, n = 6, 8, 4, 2, 64, 11
    gen = torch.Generator().manual_seed(3)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    qkv = torch.randn(n, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]  # strided views
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[2, 7]] = -1  # skipped tokens
    csrc_ops.reshape_and_cache(key, value, key_cache, value_cache, slots.to(index_dtype))

    flat_k, flat_v = key_cache.view(-1, num_kv_heads, head_dim), value_cache.view(-1, num_kv_heads, head_dim)
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], key[keep]) and torch.equal(flat_v[slots[keep]], value[keep])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(flat_k[untouched], before_k.view_as(flat_k)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view_as(flat_v)[untouched])

    csrc_ops.reshape_and_cache_reference(key, value, before_k, before_v, slots)
    assert torch.equal(before_k, key_cache) and torch.equal(before_v, value_cache)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_copy_blocks(index_dtype):
    gen = torch.Generator().manual_seed(4)
    key_cache = torch.randn(8, 4, 2, 16, generator=gen).bfloat16()
    value_cache = torch.randn(8, 4, 2, 16, generator=gen).bfloat16()
    mapping = torch.tensor([[1, 5], [1, 6], [3, 0]], dtype=index_dtype)  # one shared prefix block copied twice
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    for src, dst in mapping.tolist():
        expected_k[dst], expected_v[dst] = key_cache[src], value_cache[src]
    reference_k, reference_v = key_cache.clone(), value_cache.clone()
    csrc_ops.copy_blocks(key_cache, value_cache, mapping)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    csrc_ops.copy_blocks_reference(reference_k, reference_v, mapping)
    assert torch.equal(reference_k, expected_k) and torch.equal(reference_v, expected_v)


# errors a caller can make

def _attention_inputs(num_heads=4, num_kv_heads=2):
    key_cache, value_cache, tables, lens = make_paged([5, 9], 4, num_kv_heads, 16, torch.float32)
    return make_query(2, num_heads, num_kv_heads, 16, torch.float32), key_cache, value_cache, tables, lens


def test_paged_attention_rejects_bad_inputs():
    q, kc, vc, tables, lens = _attention_inputs()
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        csrc_ops.paged_attention(q[:, :3], kc, vc, tables, lens)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        csrc_ops.paged_attention(q, kc, vc, tables.long(), lens)
    with pytest.raises(RuntimeError, match="must equal the cache dtype"):
        csrc_ops.paged_attention(q.double(), kc, vc, tables, lens)
    with pytest.raises(RuntimeError, match="does not fit"):
        csrc_ops.paged_attention(q, kc, vc, tables, lens + 100)
    bad = tables.clone()
    bad[1, 0] = kc.size(0)
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        csrc_ops.paged_attention(q, kc, vc, bad, lens)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        csrc_ops.paged_attention(q, kc.transpose(0, 1), vc.transpose(0, 1), tables, lens)


def test_cache_ops_reject_bad_inputs():
    kc, vc = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    key = torch.randn(3, 2, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        csrc_ops.reshape_and_cache(key, key, kc, vc, torch.tensor([0, 8, 1]))
    assert not kc.any()  # checked before anything was written
    with pytest.raises(RuntimeError, match="must equal the cache dtype"):
        csrc_ops.reshape_and_cache(key.half(), key.half(), kc, vc, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="fresh"):
        csrc_ops.copy_blocks(kc, vc, torch.tensor([[0, 1], [1, 0]]))
    with pytest.raises(RuntimeError, match="out of range"):
        csrc_ops.copy_blocks(kc, vc, torch.tensor([[0, 2]]))


# torch.compile support: fake implementations

def test_opcheck():
    q, kc, vc, tables, lens = _attention_inputs()
    torch.library.opcheck(torch.ops.fastchat.paged_attention.default, (q, kc, vc, tables, lens, 0.25))
    key = torch.randn(3, 2, 16)
    torch.library.opcheck(torch.ops.fastchat.reshape_and_cache.default, (key, key + 1, kc, vc, torch.tensor([0, -1, 7])))
    torch.library.opcheck(torch.ops.fastchat.copy_blocks.default, (kc, vc, torch.tensor([[0, 3]])))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        kc, vc = torch.empty(10, 16, 2, 128, dtype=torch.bfloat16), torch.empty(10, 16, 2, 128, dtype=torch.bfloat16)
        q = torch.empty(3, 8, 128, dtype=torch.bfloat16)
        out = csrc_ops.paged_attention(q, kc, vc, torch.empty(3, 4, dtype=torch.int32),
                                       torch.empty(3, dtype=torch.int32))
        assert out.shape == (3, 8, 128) and out.dtype == torch.bfloat16


def test_compiles_without_graph_breaks():
    q, kc, vc, tables, lens = _attention_inputs()
    key, value = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    last = lens.long() - 1  # overwrite each sequence's last token, as a decode step does
    slots = tables[torch.arange(2), last // 4].long() * 4 + last % 4

    def step(q, key, value, kc, vc):
        csrc_ops.reshape_and_cache(key, value, kc, vc, slots)
        return csrc_ops.paged_attention(q, kc, vc, tables, lens)

    kc2, vc2 = kc.clone(), vc.clone()
    expected = step(q, key, value, kc, vc)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, key, value, kc2, vc2)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(kc2, kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc2, vc, rtol=0, atol=0, equal_nan=True)


# CUDA kernels (d20 shapes: 10 query heads of 128, block size 16, bf16)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [10, 5, 2, 1])
@pytest.mark.parametrize("lens", [
    "many",      # 64 ragged sequences: one thread block per (sequence, kv head)
    "long",      # few long sequences: split-KV partitions and the reduce kernel
    "edges",     # lengths 0, 1, partition and block boundaries, with split-KV
])
def test_cuda_paged_attention(dtype, num_kv_heads, lens):
    gen = torch.Generator().manual_seed(5)
    lens = {
        "many": torch.randint(1, 2049, (64,), generator=gen).tolist(),
        "long": [32768, 5000, 129],
        "edges": [0, 1, 16, 17, 127, 128, 129, 511, 512, 513, 1000],
    }[lens]
    key_cache, value_cache, tables, context_lens = make_paged(lens, 16, num_kv_heads, 128, dtype, "cuda")
    query = make_query(len(lens), 10, num_kv_heads, 128, dtype, "cuda")
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens)
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens)
    assert_close(out, expected, dtype)
    on_cpu = csrc_ops.paged_attention(*(t.cpu() for t in (query, key_cache, value_cache, tables, context_lens)))
    assert_close(out.cpu(), on_cpu, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("batch", [1, 40])  # split and not
def test_cuda_paged_attention_head_dim_64(block_size, batch):
    lens = torch.randint(1, 3000, (batch,), generator=torch.Generator().manual_seed(6)).tolist()
    key_cache, value_cache, tables, context_lens = make_paged(lens, block_size, 4, 64, torch.bfloat16, "cuda")
    query = make_query(batch, 16, 4, 64, torch.bfloat16, "cuda")
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens, 0.1)
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens, 0.1)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 5, 60])
def test_cuda_paged_attention_graph_wide_table(batch):
    """The engine's graphs pass a block table as wide as the longest possible sequence (512 blocks) for short
    contexts: split-KV must follow the real contexts (every partition, none past the end, both kernels)."""
    lens = torch.randint(1, 1500, (batch,), generator=torch.Generator().manual_seed(8)).tolist()
    key_cache, value_cache, tables, context_lens = make_paged(lens, 16, 10, 128, torch.bfloat16, "cuda")
    wide = torch.full((batch, 512), -1, dtype=torch.int32, device="cuda")
    wide[:, :tables.size(1)] = tables
    query = make_query(batch, 10, 10, 128, torch.bfloat16, "cuda")
    out = csrc_ops.paged_attention(query, key_cache, value_cache, wide, context_lens)
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
def test_cuda_paged_attention_context_longer_than_its_row():
    """CUDA cannot check context_lens against the table without a sync: a longer context reads its whole row
    and nothing past it (split-KV included: one sequence splits)."""
    key_cache, value_cache, tables, context_lens = make_paged([1008], 16, 10, 128, torch.bfloat16, "cuda")
    query = make_query(1, 10, 10, 128, torch.bfloat16, "cuda")
    out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, context_lens + 4000)
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, context_lens)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads", [10, 2])
@pytest.mark.parametrize("case", ["mixed", "fresh", "one_token"])
def test_cuda_prefill_varlen_matches_per_sequence(dtype, num_kv_heads, case):
    """The packed prefill (one flash varlen call, cached prefixes gathered from the cache) equals SDPA per
    sequence with offset causal masks. mixed: fresh prompts, prefix-cache hits, a chunk of one token, a long
    chunk; fresh: nothing cached (the new K/V are the context); one_token: every sequence adds one token."""
    from fastchat_core import ops
    from fastchat_core.attention import PagedBatch, paged_attention_step
    ctx = [37, 300, 129, 1000, 5, 700]
    new = {"mixed": [37, 100, 1, 1000, 3, 64], "fresh": ctx, "one_token": [1] * len(ctx)}[case]
    key_cache, value_cache, tables, context_lens = make_paged(ctx, 16, num_kv_heads, 128, dtype, "cuda")
    slots = torch.cat([(tables[i].long()[:, None] * 16 + torch.arange(16, device="cuda")).flatten()[c - n:c]
                       for i, (c, n) in enumerate(zip(ctx, new))])
    # The new tokens' K/V differ from what the cache holds at their slots (they must be written before the
    # gather) and come as the engine's do: views into one fused q/k/v output, v not contiguous.
    gen = torch.Generator("cuda").manual_seed(9)
    qkv = torch.randn(sum(new), 10 + 2 * num_kv_heads, 128, generator=gen, device="cuda").to(dtype)
    q, k, v = qkv.split([10, num_kv_heads, num_kv_heads], dim=1)
    q, k = q.contiguous(), k.contiguous()   # as the rope kernel returns them

    def run(reference):
        batch = PagedBatch(True, slots, tables, context_lens, list(new), list(ctx))
        saved = ops._force_reference
        ops.use_reference(reference)
        try:
            return paged_attention_step(q, k, v, key_cache, value_cache, batch)
        finally:
            ops.use_reference(saved)
    assert_close(run(False), run(True), dtype)


@pytest.mark.gpu
def test_cuda_paged_attention_in_cuda_graph():
    """Captured once, replayed after the batch's contents change in place, as the engine's decode graphs are."""
    key_cache, value_cache, tables, lens = make_paged([300, 2000, 40, 1], 16, 2, 128, torch.bfloat16, "cuda")
    query = make_query(4, 10, 2, 128, torch.bfloat16, "cuda").contiguous()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = csrc_ops.paged_attention(query, key_cache, value_cache, tables, lens)
    tables.copy_(tables.flip(0))  # rows now hold contexts of up to [1, 40, 2000, 300] tokens
    lens.copy_(torch.tensor([1, 33, 1990, 0], dtype=torch.int32))
    query.normal_()
    graph.replay()
    expected = csrc_ops.paged_attention_reference(query, key_cache, value_cache, tables, lens)
    assert_close(out, expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])  # 16-byte vector copies, or the element-wise fallback
def test_cuda_reshape_and_cache_and_copy_blocks(dtype, aligned):
    num_blocks, block_size, num_kv_heads, head_dim, n = 64, 16, 10, 128, 300
    gen = torch.Generator().manual_seed(7)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    shift = 0 if aligned else 1  # a view one element in has rows that are not 16-byte aligned
    kv = torch.randn(n, 2, num_kv_heads, head_dim + shift, generator=gen).to(dtype)
    kv_gpu = kv.cuda()[..., shift:]  # sliced on the GPU: moving a sliced view would make it contiguous
    kv = kv[..., shift:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].int()
    slots[::7] = -1
    mapping = torch.tensor([[3, 60], [3, 61], [10, 62]])
    on_gpu = [t.cuda() for t in (key_cache, value_cache)]
    csrc_ops.reshape_and_cache(kv_gpu[:, 0], kv_gpu[:, 1], *on_gpu, slots.cuda())
    csrc_ops.copy_blocks(*on_gpu, mapping.cuda())
    csrc_ops.reshape_and_cache(kv[:, 0], kv[:, 1], key_cache, value_cache, slots)
    csrc_ops.copy_blocks(key_cache, value_cache, mapping)
    assert torch.equal(on_gpu[0].cpu(), key_cache) and torch.equal(on_gpu[1].cpu(), value_cache)

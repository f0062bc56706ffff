"""Paged decode attention vs the alternatives, in one run (CUDA only).

    python -m fastchat_core.bench.bench_decode_attention --out bench/results/decode_attention.json

One query token per sequence over its cached context, d20 heads (10 q, 10 kv or GQA 10/2), head_dim 128,
bf16, block size 16, block tables shuffled as a long-running server's would be. Variants:
  ours      fastchat::paged_attention (split-KV when few sequences have long contexts)
  sdpa      gather each sequence's blocks into dense K/V, then SDPA (gather included: that is the cost of
            not having a paged kernel)
  sdpa_pre  SDPA over already-dense K/V, padded to the longest context (the gather left out: a lower bound
            for any dense-cache engine)
  flex      FlexAttention over the dense K/V with a per-sequence length mask
Bandwidth is K/V bytes that must be read (each sequence's own context once) over the median time, as a %
of this card's device copy measured in the same run (bench/ceilings.py).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastchat_core.bench import ceilings
from fastchat_core.common import git_commit



def median_ms(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def make_case(B, ctx, Hq, Hk, D=128, block=16, ragged=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    if ragged:  # uniform in [ctx/2, ctx]
        lens = torch.randint(ctx // 2, ctx + 1, (B,), generator=g, device="cuda", dtype=torch.int32)
    max_blocks = -(-ctx // block)
    num_blocks = B * max_blocks + 1
    perm = torch.randperm(num_blocks - 1, generator=g, device="cuda")[: B * max_blocks].int() + 1
    tables = perm.view(B, max_blocks)
    kc = torch.randn(num_blocks, block, Hk, D, generator=g, device="cuda").bfloat16()
    vc = torch.randn(num_blocks, block, Hk, D, generator=g, device="cuda").bfloat16()
    q = torch.randn(B, Hq, D, generator=g, device="cuda").bfloat16()
    return q, kc, vc, tables, lens


def gather_dense(kc, vc, tables, max_len):
    k = kc[tables.long()].flatten(1, 2)[:, :max_len]  # (B, L, Hk, D)
    v = vc[tables.long()].flatten(1, 2)[:, :max_len]
    return k.transpose(1, 2), v.transpose(1, 2)


def run_case(B, ctx, Hq, Hk, ragged):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from fastchat_core import csrc_ops
    q, kc, vc, tables, lens = make_case(B, ctx, Hq, Hk, ragged=ragged)
    scale = q.size(-1) ** -0.5
    kv_bytes = int(lens.sum()) * Hk * q.size(-1) * 2 * 2
    max_len = int(lens.max())
    ref = csrc_ops.paged_attention_reference(q, kc, vc, tables, lens, scale, dtype=torch.float32)
    keymask = torch.arange(max_len, device="cuda")[None, :] < lens[:, None]  # (B, L)

    def ours():
        return csrc_ops.paged_attention(q, kc, vc, tables, lens, scale)

    def sdpa_gather():
        k, v = gather_dense(kc, vc, tables, max_len)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=keymask[:, None, None],
                                              scale=scale, enable_gqa=Hq != Hk)[:, :, 0]

    k_dense, v_dense = gather_dense(kc, vc, tables, max_len)
    k_dense, v_dense = k_dense.contiguous(), v_dense.contiguous()

    def sdpa_pre():
        return F.scaled_dot_product_attention(q[:, :, None], k_dense, v_dense, attn_mask=keymask[:, None, None],
                                              scale=scale, enable_gqa=Hq != Hk)[:, :, 0]

    lens_l = lens.long()
    bm = create_block_mask(lambda b, h, qi, kv: kv < lens_l[b], B, None, 1, max_len, device="cuda")
    flex_c = torch.compile(flex_attention)

    def flex():
        return flex_c(q[:, :, None], k_dense, v_dense, block_mask=bm, scale=scale, enable_gqa=Hq != Hk)[:, :, 0]

    rows = []
    for name, fn in (("ours", ours), ("sdpa", sdpa_gather), ("sdpa_pre", sdpa_pre), ("flex", flex)):
        try:
            out = fn()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = median_ms(fn)
        except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        bw = kv_bytes / (ms * 1e-3)
        rows.append({"impl": name, "median_ms": ms, "rel_err": err, "kv_GBps": bw / 1e9,
                     "pct_copy_bw": 100 * bw / ceilings.measure()["copy_bw_Bps"]})
    return {"B": B, "ctx": ctx, "Hq": Hq, "Hk": Hk, "D": 128, "ragged": ragged, "kv_bytes": kv_bytes, "rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/decode_attention.json")
    args = p.parse_args(argv)
    cases = [(64, 2048, 10, 10, False), (256, 1024, 10, 10, False), (64, 2048, 10, 2, False),
             (256, 1024, 10, 10, True), (4, 16384, 10, 10, False)]
    results = [run_case(*c) for c in cases]
    import triton
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(), "ceilings": ceilings.measure(),
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\n{'case':<28} {'impl':<9} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'rel err':>8}")
    for r in results:
        case = f"{r['B']}x{r['ctx']} {r['Hq']}/{r['Hk']}{' ragged' if r['ragged'] else ''}"
        for row in r["rows"]:
            if "error" in row:
                print(f"{case:<28} {row['impl']:<9} ERROR {row['error'][:60]}")
            else:
                print(f"{case:<28} {row['impl']:<9} {row['median_ms']:>8.3f} {row['kv_GBps']:>7.0f} "
                      f"{row['pct_copy_bw']:>5.1f}% {row['rel_err']:>8.1e}")


if __name__ == "__main__":
    main()

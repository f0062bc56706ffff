"""Offline serving throughput (CUDA): our engine vs HF transformers generate vs one request at a time.

    python -m fastchat_core.bench.bench_serving --out bench/results/serving.json

Workload (fixed seed): 256 requests, input and output lengths uniform in 100..1024, random prompt tokens,
a d20-shaped model (MHA, or --n-kv-head for GQA) with random bf16 weights; every request generates exactly
its output length (ignore_eos, greedy). Baselines on the same lengths:
  sync     our engine with overlap=False: each step's tokens reach the host before the next step is launched
  hf       transformers LlamaForCausalLM with the same width/depth/heads/vocab and an MLP of equal FLOPs
           (SwiGLU with 8/3 x dim), `generate` with a static cache, batches of --hf-batch prompts (left
           padded), each batch generating its longest output (only the requested tokens are counted)
  serial   our engine with max_num_seqs=1: the naive one-request-at-a-time loop, on --serial-requests
Roofline: every decode step reads the weights once plus each running sequence's K/V; with all requests
started together, the sum over steps of those bytes at this card's copy bandwidth, plus prefill FLOPs at its
matmul rate, both measured in the same run (bench/ceilings.py).
"""
import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch



def workload(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        n_in, n_out = rng.randint(lo, hi), rng.randint(lo, hi)
        reqs.append(([rng.randrange(vocab) for _ in range(n_in)], n_out))
    return reqs


def roofline_tokens_per_s(reqs, cfg, weight_bytes, copy_bw, matmul):
    kv_tok = cfg.kv_bytes_per_token(2)
    t = sum(2 * cfg.flops_per_token(len(p)) / 3 * len(p) for p, _ in reqs) / matmul  # prefill: forward only
    for s in range(max(o for _, o in reqs)):
        live = [(len(p) + s) for p, o in reqs if o > s]
        t += (weight_bytes + kv_tok * sum(live)) / copy_bw
    return sum(o for _, o in reqs) / t


def build_model(depth, n_kv_head, seed=0):
    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    cfg = ModelConfig(depth=depth, n_kv_head=n_kv_head)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = GPT(cfg).init_weights(seed)
    with torch.no_grad():  # random weights everywhere (the zero-initialized projections too)
        for p in model.parameters():
            p.normal_(0, p.size(-1) ** -0.5)
    return model.to(torch.bfloat16).eval(), cfg


def drive(engine, prompts, params):
    """engine.generate, timing each step by what the scheduler held when it began: steps with requests
    still waiting (the ramp, prefill mixed in), then decode-only steps by running count. Says where the
    time goes against the roofline (which has every request decoding from the start)."""
    phases, step = {}, engine.step

    def timed_step():
        waiting, running = len(engine.scheduler.waiting), len(engine.scheduler.running)
        t = time.perf_counter()
        deltas = step()
        name = "ramp" if waiting else "running>=128" if running >= 128 else "running 32-127" if running >= 32 \
            else "running<32"
        ph = phases.setdefault(name, {"steps": 0, "seconds": 0.0, "tokens": 0})
        ph["steps"] += 1
        ph["seconds"] += time.perf_counter() - t
        ph["tokens"] += sum(len(d.new_token_ids) for d in deltas)
        return deltas

    engine.step = timed_step
    try:
        return engine.generate(prompts, params), phases
    finally:
        del engine.step


def run_engine(model, reqs, **kw):
    """One engine.generate over the workload after a warm-up; works on CPU too (smoke tests)."""
    from fastchat_core.engine import Engine, SamplingParams
    engine = Engine(model, **kw)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    warm = [[1, 2, 3, 4] * 8] * 4
    engine.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # graphs, autotune
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for _, o in reqs]
    sync()
    t0 = time.perf_counter()
    results, phases = drive(engine, [p for p, _ in reqs], params)
    sync()
    dt = time.perf_counter() - t0
    n_out = sum(len(r.token_ids) for r in results)
    assert n_out == sum(o for _, o in reqs), "engine produced a different number of tokens than requested"
    stats = {"requests": len(reqs), "output_tokens": n_out, "seconds": dt, "output_tok_per_s": n_out / dt,
             "kv_blocks_total": engine.block_manager.num_blocks,
             "kv_blocks_free_after": engine.block_manager.num_free_blocks, "phases": phases}
    del engine
    release_gpu_memory()
    return stats, results


def release_gpu_memory():
    """After `del engine`: the next Engine sizes its KV cache from the free memory, so the last one's
    (kept by reference cycles until a collection, then by PyTorch's cache) must really be gone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_engine(model, reqs, path, start=200, steps=40):
    """Step the engine by hand over the workload and profile steps start..start+steps (all requests admitted
    and decoding by then): wall time per step vs GPU kernel time per step says whether the step is bound by
    the GPU or by the host; cProfile of the same steps says where the host time goes."""
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity, profile
    from fastchat_core.engine import Engine, SamplingParams
    engine = Engine(model)
    for p, o in reqs:
        engine.add_request(p, SamplingParams(max_tokens=o, temperature=0, ignore_eos=True))
    for _ in range(start):
        engine.step()
    running = len(engine.scheduler.running)
    cuda = next(model.parameters()).is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    py = cProfile.Profile()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        t0 = time.perf_counter()
        py.enable()
        for _ in range(steps):
            engine.step()
        py.disable()
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_ms = sum(e.self_device_time_total for e in events) / 1e3
    host = io.StringIO()
    pstats.Stats(py, stream=host).sort_stats("tottime").print_stats(25)
    Path(path).write_text(f"steps {start}..{start + steps}, {running} sequences running\n"
                          f"wall {1e3 * wall / steps:.2f} ms/step, GPU kernels {gpu_ms / steps:.2f} ms/step\n\n"
                          + events.table(sort_by="self_device_time_total", row_limit=30)
                          + "\n\nPython, sorted by own time:\n" + host.getvalue())
    del engine
    release_gpu_memory()
    return {"steps": [start, start + steps], "running": running, "wall_ms_per_step": 1e3 * wall / steps,
            "gpu_kernel_ms_per_step": gpu_ms / steps, "file": Path(path).name}


def run_hf(cfg, reqs, batch):
    from transformers import LlamaConfig, LlamaForCausalLM
    hcfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=8 * cfg.dim // 3,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hcfg).to(torch.bfloat16).eval()
    n_tok, t_total = 0, 0.0
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        L = max(len(p) for p, _ in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long, device="cuda")
        mask = torch.zeros_like(ids)
        for j, (p, _) in enumerate(chunk):  # left padding
            ids[j, L - len(p):] = torch.tensor(p)
            mask[j, L - len(p):] = 1
        new = max(o for _, o in chunk)
        kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
        if i == 0:
            model.generate(ids[:, :32], attention_mask=mask[:, :32], max_new_tokens=8, do_sample=False,
                           cache_implementation="static", pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t_total += time.perf_counter() - t0
        n_tok += sum(o for _, o in chunk)
    del model
    torch.cuda.empty_cache()
    return {"requests": len(reqs), "output_tokens": n_tok, "seconds": t_total, "output_tok_per_s": n_tok / t_total,
            "batch": batch}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/serving.json")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--n-kv-head", type=int, default=0)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--hf-requests", type=int, default=64)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--serial-requests", type=int, default=4)
    p.add_argument("--skip", default="", help="comma list of rows to skip: compiled,hf,serial,sync")
    p.add_argument("--groups", type=int, default=0,
                   help="also this many prompts x --group-size copies each (n > 1, RL groups), with prompt "
                        "sharing (prefix caching) on and off")
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed passes of our engine over the workload")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also profile a window of steady-state steps: GPU kernel table + Python hot spots")
    args = p.parse_args(argv)
    model, cfg = build_model(args.depth, args.n_kv_head)
    reqs = workload(args.requests, 100, 1024, cfg.vocab_size)
    # bytes read per decode step: every weight except the embedding table (only B rows of it are read)
    weight_bytes = (cfg.num_params() - cfg.vocab_size * cfg.dim) * 2
    from fastchat_core.bench import ceilings
    from fastchat_core.common import git_commit
    ceil = ceilings.measure()
    bound = roofline_tokens_per_s(reqs, cfg, weight_bytes, ceil["copy_bw_Bps"], ceil["matmul_flops"])
    # The first pass pays one-time costs (allocator growth, kernel selection); a server lives long, so the
    # best of --repeats passes is the steady state, and every pass is reported.
    def best_of_passes(**kw):
        passes = [run_engine(model, reqs, **kw)[0] for _ in range(args.repeats)]
        row = dict(max(passes, key=lambda r: r["output_tok_per_s"]))
        row["runs_output_tok_per_s"] = [r["output_tok_per_s"] for r in passes]
        row["pct_of_roofline"] = 100 * row["output_tok_per_s"] / bound
        return row

    ours = best_of_passes()
    if args.profile:
        ours["profile"] = profile_engine(model, reqs, args.profile)
    print(f"ours: {ours}", flush=True)
    rows = {"ours": ours}
    skip = set(args.skip.split(","))
    if "compiled" not in skip:   # the candidate: the decode step through torch.compile (compiled in warm-up)
        rows["compiled"] = best_of_passes(compile_decode=True)
        print(f"compiled: {rows['compiled']}", flush=True)
    if "sync" not in skip:   # the same engine without overlapping host work and GPU steps
        rows["sync"], _ = run_engine(model, reqs, overlap=False)
        print(f"sync: {rows['sync']}", flush=True)
    if "serial" not in skip:
        sub = reqs[:args.serial_requests]
        rows["serial"], _ = run_engine(model, sub, max_num_seqs=1)
        print(f"serial: {rows['serial']}", flush=True)
    if args.groups:   # the same workload twice: the copies of a prompt share its K/V, or each computes it
        greqs = [r for r in workload(args.groups, 100, 1024, cfg.vocab_size, seed=1) for _ in range(args.group_size)]
        rows["groups_shared"], _ = run_engine(model, greqs)
        rows["groups_unshared"], _ = run_engine(model, greqs, enable_prefix_caching=False)
        print(f"groups: shared {rows['groups_shared']}\nunshared {rows['groups_unshared']}", flush=True)
    del model
    torch.cuda.empty_cache()
    if "hf" not in skip:
        try:
            rows["hf_static"] = run_hf(cfg, reqs[:args.hf_requests], args.hf_batch)
        except Exception as e:  # report, do not lose the engine's numbers
            rows["hf_static"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"hf: {rows['hf_static']}", flush=True)
    import triton
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(),
           "model": {"depth": cfg.depth, "dim": cfg.dim, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
                     "vocab": cfg.vocab_size, "params": cfg.num_params(), "dtype": "bfloat16"},
           "workload": {"requests": args.requests, "in_out_uniform": [100, 1024], "seed": 0,
                        "mean_context": sum(len(p) + o / 2 for p, o in reqs) / len(reqs),
                        "groups": {"prompts": args.groups, "copies": args.group_size, "seed": 1} if args.groups else None},
           "ceilings": ceil, "roofline_output_tok_per_s": bound, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\nroofline (this workload): {bound:,.0f} output tok/s")
    print(f"{'impl':<10} {'requests':>8} {'out tok/s':>10} {'vs ours':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<10} ERROR {r['error'][:80]}")
            continue
        print(f"{name:<10} {r['requests']:>8} {r['output_tok_per_s']:>10,.0f} "
              f"{ours['output_tok_per_s'] / r['output_tok_per_s']:>7.1f}x")


if __name__ == "__main__":
    main()

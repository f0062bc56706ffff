"""Pretrain a base model: `fastchat train base` or `torchrun --nproc_per_node=N -m fastchat_core.train.base`.

Runs on CPU (gloo), one GPU, or N GPUs / nodes under torchrun (NCCL). Data parallel with gradients
reduced inside the optimizer step (each rank orthogonalizes its share of the Muon matrices). Progress line
with loss, tokens/s, MFU and ETA; metrics JSONL; atomic checkpoints; `--resume` continues exactly.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fastchat_core import ops
from fastchat_core.checkpoint import (CheckpointError, load_checkpoint, load_meta, resolve_checkpoint,
                                      resume_checkpoint, save_checkpoint)
from fastchat_core.common import MetricsLog, add_run_args, cleanup_dist, data_root, home_dir, print0, setup_run
from fastchat_core.config import ModelConfig
from fastchat_core.eval.bpb import evaluate_bpb
from fastchat_core.model import GPT
from fastchat_core.optim import add_optim_args, apply_schedules, build_optimizers

# Dense bf16 peak of the GPUs we plan for (datasheet), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="fastchat train base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20)
    g.add_argument("--n-kv-head", type=int, default=0, help="0 = MHA, 1 = MQA, else GQA")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--vocab-size", type=int, default=65536, help="only with --random-data (else the tokenizer's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="folder/file of parquet, jsonl(.gz) or txt(.gz); "
                   "default $FASTCHAT_DATA/pretrain")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default $FASTCHAT_HOME/tokenizer)")
    g.add_argument("--random-data", action="store_true", help="uniform random tokens (benchmarks)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=32, help="rows per rank per micro-step")
    g.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step")
    g.add_argument("--num-iterations", type=int, default=-1)
    g.add_argument("--target-param-data-ratio", type=float, default=20.0,
                   help="tokens = ratio * params, when --num-iterations is not given")
    add_optim_args(g)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--warmdown-ratio", type=float, default=0.2)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    add_run_args(g, "default $FASTCHAT_HOME/base/d<depth>")
    g.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --run-dir "
                   "(damaged ones are skipped with a warning)")
    g.add_argument("--accept-data-restart", action="store_true", help="with --resume: when the checkpoint holds no "
                   "data loader position, restart the data from its first document instead of stopping")
    g.add_argument("--init-from", default=None, help="start from this checkpoint's weights (fresh optimizer)")
    g.add_argument("--save-every", type=int, default=0, help="0 = only at the end, -1 = never (benchmarks)")
    g.add_argument("--eval-every", type=int, default=250)
    g.add_argument("--eval-tokens", type=int, default=1 << 20)
    g.add_argument("--sample-every", type=int, default=0)
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="fused Triton kernels on CUDA (--no-kernels forces the PyTorch references)")
    g.add_argument("--profile", default=None, help="write a torch profiler table of the top kernels here")
    args = p.parse_args(argv)
    if args.seq_len < 8:
        p.error("--seq-len must be >= 8")
    return args


class RandomTokens:
    """Uniform random tokens. The global batch of a step depends only on (seed, step), and each rank takes
    its rows of it, so N ranks and 1 rank with the same total batch see the same data."""

    def __init__(self, vocab_size, B, T, rank, world, accum, seed, device, state=None):
        self.vocab, self.B, self.T, self.rank, self.world, self.accum = vocab_size, B, T, rank, world, accum
        self.seed, self.device = seed, device
        self.i = (state or {}).get("i", 0)  # micro-batches served so far on this rank

    def __iter__(self):
        return self

    def __next__(self):
        step, micro = divmod(self.i, self.accum)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = torch.randint(0, self.vocab, (self.B * self.world * self.accum, self.T + 1), generator=gen)
        start = (micro * self.world + self.rank) * self.B
        chunk = rows[start:start + self.B].to(self.device, non_blocking=True)
        self.i += 1
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self):
        return {"i": self.i}


def main(argv=None):
    args = get_args(argv)
    run = setup_run(args, seed=args.seed)
    rank, _, world, device = run
    ops.use_reference(not args.kernels)

    # Batch arithmetic: tokens per micro-step across ranks must divide the total batch.
    T, B = args.seq_len, args.device_batch_size
    per_micro = B * T * world
    if args.total_batch_size % per_micro:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of device_batch*seq_len*ranks "
                         f"= {B}*{T}*{world} = {per_micro}; pick e.g. {per_micro * max(1, args.total_batch_size // per_micro)}")
    accum = args.total_batch_size // per_micro

    # Tokenizer and data.
    tokenizer = None
    if args.random_data:
        vocab_size = args.vocab_size
    else:
        from fastchat_core.data import DataLoader
        from fastchat_core.tokenizer import get_tokenizer
        tokenizer = get_tokenizer(args.tokenizer)
        vocab_size = tokenizer.vocab_size
        data_path = args.data or (data_root() / "pretrain" if data_root() else None)
        if data_path is None or not Path(data_path).exists():
            raise SystemExit(f"no pretraining data at {data_path}: pass --data DIR or set FASTCHAT_DATA "
                             "(or use --random-data for a benchmark)")

    cfg = ModelConfig(depth=args.depth, vocab_size=vocab_size, seq_len=T, n_kv_head=args.n_kv_head)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights(args.seed)
    if args.init_from:
        src = resolve_checkpoint(args.init_from)
        try:
            theirs = load_meta(src)["model_config"]
            differ = {k: (v, theirs.get(k)) for k, v in cfg.to_dict().items() if theirs.get(k) != v}
            if differ:
                raise CheckpointError(f"{src} holds a different model: " + ", ".join(
                    f"{k}={b} there vs {a} here" for k, (a, b) in differ.items()) + "; match the flags or drop it")
            load_checkpoint(src, model, None, device)
        except CheckpointError as e:
            raise SystemExit(f"--init-from: {e}") from e
    n_params = model.num_params()
    flops_per_token = cfg.flops_per_token()
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        num_steps = max(1, round(args.target_param_data_ratio * n_params / args.total_batch_size))
    run_dir = Path(args.run_dir or home_dir() / "base" / f"d{args.depth}")
    run_dir.mkdir(parents=True, exist_ok=True)

    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay)
    step, loader_state = 0, None
    if args.resume:
        try:
            ckpt, meta, loader_state = resume_checkpoint(run_dir, model, optimizers, device)
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}") from e
        if loader_state is None:  # silently starting the data over would train on its first documents again
            if not args.accept_data_restart:
                raise SystemExit(f"--resume: {ckpt} holds no data loader position (loader_rank*.json): restore it, "
                                 "or pass --accept-data-restart to restart the data from its first document")
            print0(f"--accept-data-restart: {ckpt} holds no data loader position; the data restarts from the start")
        step = meta["step"]
        print0(f"resumed from {ckpt} at step {step}")

    def make_loader(split, state=None, rows=B):
        if args.random_data:
            seed = args.seed if split == "train" else args.seed + 7919
            return RandomTokens(vocab_size, rows, T, rank, world, accum if split == "train" else 1, seed, device, state)
        return DataLoader(tokenizer, data_path, rows, T, split=split, rank=rank, world_size=world,
                          device=device, state=state)

    train_loader = make_loader("train", loader_state)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    autocast = run.autocast()
    token_bytes = tokenizer.token_bytes().to(device) if tokenizer is not None else None
    peak = peak_flops(device)

    print0(f"model: depth {cfg.depth}, dim {cfg.dim}, heads {cfg.n_head}/{cfg.n_kv_head} kv, "
           f"{n_params / 1e6:.1f}M params, {flops_per_token / 1e9:.2f} GFLOPs/token, vocab {vocab_size}")
    print0(f"batch: {B}x{T} per rank x {world} ranks x {accum} accum = {args.total_batch_size:,} tokens/step; "
           f"{num_steps} steps; device {device}, compile {use_compile}, kernels {args.kernels and device.type == 'cuda'}")

    @torch.no_grad()
    def evaluate():
        model.eval()
        steps = max(1, args.eval_tokens // (B * T * world))
        loader = make_loader("val", rows=B)
        with autocast:
            if token_bytes is not None:
                val = evaluate_bpb(fwd, (next(loader) for _ in range(steps)), token_bytes)
            else:
                val = sum(fwd(*next(loader)).item() for _ in range(steps)) / steps
        model.train()
        return val

    def checkpoint(at):
        meta = {"model_config": cfg.to_dict(), "args": vars(args), "tokens": at * args.total_batch_size}
        save_checkpoint(run_dir, at, model, optimizers, train_loader.state_dict(), meta)

    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=2, warmup=2, active=3, repeat=1))
        prof.start()

    with MetricsLog(run_dir / "metrics.jsonl") as log:
        model.train()
        t_total, steps_timed = 0.0, 0
        while step < num_steps:
            if args.eval_every and step % args.eval_every == 0:
                val = evaluate()
                print0(f"step {step:5d} | val {'bpb' if token_bytes is not None else 'loss'} {val:.4f}")
                log({"step": step, "val_bpb" if token_bytes is not None else "val_loss": val})
            if args.sample_every and tokenizer is not None and step % args.sample_every == 0 and step > 0 and rank == 0:
                model.eval()
                with autocast:
                    for prompt in ("The capital of France is", "def fibonacci(n):"):
                        out = list(model.generate(tokenizer.encode(prompt, prepend=tokenizer.bos_id), 16))
                        print0(f"  sample: {prompt!r} -> {tokenizer.decode(out)!r}")
                model.train()

            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                x, y = next(train_loader)
                with autocast:
                    loss = fwd(x, y)
                (loss / accum).backward()
                loss_sum += loss.detach()
            apply_schedules(optimizers, step, num_steps, warmup_steps=args.warmup_steps,
                            warmdown_ratio=args.warmdown_ratio)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if world > 1:  # log the global mean, not rank 0's share
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
            train_loss = (loss_sum / accum).item()  # one sync per step, for the progress line
            dt = time.perf_counter() - t0
            step += 1
            if prof is not None:
                prof.step()
            if step > 3:  # the first steps include compilation
                t_total += dt
                steps_timed += 1
            tok_s = args.total_batch_size / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            eta = (num_steps - step) * (t_total / steps_timed if steps_timed else dt)
            rec = {"step": step, "loss": train_loss, "dt": dt, "tok_per_s": tok_s, "mfu": mfu}
            log(rec)
            if not math.isfinite(train_loss):
                raise SystemExit(f"loss is {train_loss} at step {step}: lower the learning rates or check the data")
            if step % args.log_every == 0 or step == num_steps:
                mfu_s = f" | MFU {100 * mfu:.1f}%" if mfu else ""
                print0(f"step {step:5d}/{num_steps} | loss {train_loss:.4f} | {dt * 1000:.0f} ms | "
                       f"{tok_s:,.0f} tok/s{mfu_s} | ETA {eta / 60:.1f} min")
            if args.save_every > 0 and step % args.save_every == 0 and step < num_steps:
                checkpoint(step)

        if prof is not None:
            prof.stop()
            if rank == 0:
                Path(args.profile).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
        if args.save_every >= 0:
            checkpoint(step)
        summary = {"params": n_params, "flops_per_token": flops_per_token, "steps": step,
                   "tokens_per_s": args.total_batch_size * steps_timed / t_total if t_total else None}
        if summary["tokens_per_s"] and peak:
            summary["mfu"] = flops_per_token * summary["tokens_per_s"] / (peak * world)
        if args.eval_every:
            summary["val"] = evaluate()
            print0(f"final val {'bpb' if token_bytes is not None else 'loss'}: {summary['val']:.4f}")
        log({"summary": summary})
        if device.type == "cuda":
            summary["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        print0("summary: " + json.dumps(summary))
    cleanup_dist()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

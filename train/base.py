"""Pretrain a base model: `fastchat train base` or `torchrun --nproc_per_node=N -m fastchat_core.train.base`.

Runs on CPU (gloo), one GPU, or N GPUs / nodes under torchrun (NCCL). Data parallel with gradients
reduced inside the optimizer step (each rank orthogonalizes its share of the Muon matrices). What is base's own
is here: packed text (or random tokens), the next-token loss, bits per byte on held-out text; the loop around it
(progress line with tokens/s, MFU and ETA, metrics.jsonl, atomic checkpoints, exact `--resume`) is
fastchat_core.training's, shared with mid, SFT and RL.
"""
import argparse
import sys
from pathlib import Path

import torch

from fastchat_core import ops
from fastchat_core.checkpoint import CheckpointError, load_checkpoint, load_meta, resolve_checkpoint
from fastchat_core.cli import run as run_command
from fastchat_core.common import ConfigError, DataError, data_root, home_dir, print0
from fastchat_core.config import ModelConfig, add_model_option_args, model_options
from fastchat_core.eval.bpb import evaluate_bpb
from fastchat_core.model import GPT
from fastchat_core.optim import (add_optim_args, batch_lr_scale, build_optimizers, optimizer_options, scaling_params,
                                 schedule_options, set_recipe_defaults, weight_decay_scale)
from fastchat_core.training import Trainer, accumulate, add_loop_args, add_run_args, setup_run, step_optimizers


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="fastchat train base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=20)
    g.add_argument("--n-kv-head", type=int, default=0, help="0 = MHA, 1 = MQA, else GQA")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--vocab-size", type=int, default=65536, help="only with --random-data (else the tokenizer's)")
    add_model_option_args(g)
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
    add_optim_args(g, pretraining=True)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--warmdown-ratio", type=float, default=0.2)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    add_run_args(g, "default $FASTCHAT_HOME/base/d<depth>")
    add_loop_args(g)
    g.add_argument("--init-from", default=None, help="start from this checkpoint's weights (fresh optimizer)")
    g.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (0 = never)")
    g.add_argument("--eval-tokens", type=int, default=1 << 20)
    g.add_argument("--sample-every", type=int, default=0, help="print two greedy samples every N steps (0 = never)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="fused Triton kernels on CUDA (--no-kernels forces the PyTorch references)")
    g.add_argument("--profile", default=None, help="write a torch profiler table of the top kernels here")
    set_recipe_defaults(p, argv)   # --optim-recipe's values become the defaults; explicit flags still win
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


def grad_accum(args, world) -> int:
    """Micro-steps per optimizer step: tokens per micro-step across ranks must divide the total batch."""
    per_micro = args.device_batch_size * args.seq_len * world
    if args.total_batch_size % per_micro:
        raise ConfigError(f"--total-batch-size {args.total_batch_size} is not a multiple of device_batch*seq_len*ranks "
                          f"= {args.device_batch_size}*{args.seq_len}*{world} = {per_micro}; pick e.g. "
                          f"{per_micro * max(1, args.total_batch_size // per_micro)}")
    return args.total_batch_size // per_micro


def text_source(args):
    """(tokenizer, vocab size, data path): the tokenizer and text, or (None, --vocab-size, None) with --random-data."""
    if args.random_data:
        return None, args.vocab_size, None
    from fastchat_core.tokenizer import get_tokenizer
    tokenizer = get_tokenizer(args.tokenizer)
    data_path = args.data or (data_root() / "pretrain" if data_root() else None)
    if data_path is None or not Path(data_path).exists():
        raise DataError(f"no pretraining data at {data_path}: pass --data DIR or set FASTCHAT_DATA "
                        "(or use --random-data for a benchmark)")
    return tokenizer, tokenizer.vocab_size, data_path


def build_model(args, cfg, device):
    """The GPT initialized from --seed, or with the weights of --init-from (which must hold the same model)."""
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
            raise type(e)(f"--init-from: {e}") from e
    return model


def main(argv=None):
    args = get_args(argv)
    with setup_run(args, seed=args.seed) as run:
        return train(args, run)


def train(args, run):
    rank, _, world, device = run
    ops.use_reference(not args.kernels)
    T, B = args.seq_len, args.device_batch_size
    accum = grad_accum(args, world)
    tokenizer, vocab_size, data_path = text_source(args)
    cfg = ModelConfig(depth=args.depth, vocab_size=vocab_size, seq_len=T, n_kv_head=args.n_kv_head,
                      **model_options(args))
    model = build_model(args, cfg, device)
    n_params, flops_per_token = model.num_params(), cfg.flops_per_token()
    if args.num_iterations > 0:
        num_steps = args.num_iterations
    else:
        num_steps = max(1, round(args.target_param_data_ratio * n_params / args.total_batch_size))
    lr_scale, wd_scale = optim_scales(args, model, cfg)
    optimizers = build_optimizers(model, **dict(optimizer_options(args), scalar_lr=args.scalar_lr * lr_scale),
                                  matrix_lr=args.matrix_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                                  unembedding_lr=args.unembedding_lr * lr_scale, weight_decay=args.weight_decay * wd_scale)
    trainer = Trainer(args, run, model, optimizers, args.run_dir or home_dir() / "base" / f"d{args.depth}", num_steps,
                      stage="base", meta={"model_config": cfg.to_dict(), "args": vars(args)},
                      warmup_steps=args.warmup_steps, warmdown_ratio=args.warmdown_ratio,
                      flops_per_token=flops_per_token, **schedule_options(args))
    loader_state = trainer.resume()

    def make_loader(split, state=None):
        if args.random_data:
            seed = args.seed if split == "train" else args.seed + 7919
            return RandomTokens(vocab_size, B, T, rank, world, accum if split == "train" else 1, seed, device, state)
        from fastchat_core.data import DataLoader
        return DataLoader(tokenizer, data_path, B, T, split=split, rank=rank, world_size=world, device=device,
                          state=state)

    train_loader = make_loader("train", loader_state)
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    fwd = torch.compile(model, dynamic=False) if use_compile else model
    autocast = run.autocast()
    token_bytes = tokenizer.token_bytes().to(device) if tokenizer is not None else None
    print0(f"model: depth {cfg.depth}, dim {cfg.dim}, heads {cfg.n_head}/{cfg.n_kv_head} kv, "
           f"{n_params / 1e6:.1f}M params, {flops_per_token / 1e9:.2f} GFLOPs/token, vocab {vocab_size}")
    kernels = args.kernels and device.type == "cuda"
    print0(f"batch: {B}x{T} per rank x {world} ranks x {accum} accum = {args.total_batch_size:,} tokens/step; "
           f"{num_steps} steps; device {device}, compile {use_compile}, kernels {kernels}")

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        steps = max(1, args.eval_tokens // (B * T * world))
        loader = make_loader("val")
        with autocast:
            if token_bytes is not None:
                val = {"val_bpb": evaluate_bpb(fwd, (next(loader) for _ in range(steps)), token_bytes)}
            else:
                val = {"val_loss": sum(fwd(*next(loader)).item() for _ in range(steps)) / steps}
        model.train()
        return val

    def loss_fn(batch):
        loss = fwd(*batch)
        return loss / accum, loss

    prof = profiler(args.profile)

    def train_step(step):
        if args.sample_every and tokenizer is not None and step % args.sample_every == 0 and step > 0 and rank == 0:
            sample(model, tokenizer, autocast)
        loss_sum = accumulate((next(train_loader) for _ in range(accum)), loss_fn, autocast)
        step_optimizers(model, optimizers)
        if world > 1:  # log the global mean, not rank 0's share
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        if prof is not None:
            prof.step()
        return args.total_batch_size, {"loss": (loss_sum / accum).item()}  # one sync per step, for the progress line

    model.train()
    summary = trainer.fit(train_step, train_loader.state_dict, evaluate if args.eval_every else None, args.eval_every)
    if prof is not None:
        prof.stop()
        if rank == 0:
            Path(args.profile).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    return summary


def optim_scales(args, model, cfg):
    """(LR multiplier, weight-decay multiplier) of --batch-lr-scaling / --wd-scaling: nanochat's corrections for the
    total batch against 2^19 tokens and, for weight decay, for the model's size against a d12 reference."""
    lr_scale = batch_lr_scale(args.total_batch_size) if args.batch_lr_scaling else 1.0
    wd_scale = 1.0
    if args.wd_scaling:
        from dataclasses import replace
        with torch.device("meta"):
            ref = GPT(replace(cfg, depth=12, dim=0, n_kv_head=0))   # nanochat's reference: d12, MHA
        wd_scale = weight_decay_scale(args.total_batch_size, scaling_params(model), scaling_params(ref))
    if lr_scale != 1.0 or wd_scale != 1.0:
        print0(f"batch {args.total_batch_size:,} tokens: LRs x{lr_scale:.4f}, weight decay x{wd_scale:.4f}")
    return lr_scale, wd_scale


@torch.no_grad()
def sample(model, tokenizer, autocast):
    """Two greedy continuations, printed (their time counts in that step's dt)."""
    model.eval()
    with autocast:
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            out = list(model.generate(tokenizer.encode(prompt, prepend=tokenizer.bos_id), 16))
            print0(f"  sample: {prompt!r} -> {tokenizer.decode(out)!r}")
    model.train()


def profiler(path):
    """A started torch profiler recording steps 5-7 when --profile names a file, else None."""
    if not path:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=2, warmup=2, active=3, repeat=1))
    prof.start()
    return prof


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat train base"))

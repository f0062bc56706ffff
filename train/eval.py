"""Evaluate a checkpoint: `fastchat train eval --checkpoint DIR [--core] [--bpb] [--chat]` (torchrun for several GPUs).

--core   CORE, the DCLM in-context-learning suite (fastchat_core.eval.core), for base models
--bpb    bits per byte on the held-out split of the pretraining data
--chat   ChatCORE (fastchat_core.eval.chat), for chat models
With none of them: --core --bpb for a checkpoint under base/, --chat otherwise. Results are merged into
eval.json in the checkpoint's run folder (one entry per evaluation, each naming the step it measured), which
`fastchat report` reads.
"""
import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastchat_core.checkpoint import load_model, resolve_checkpoint
from fastchat_core.cli import run as run_command
from fastchat_core.common import ConfigError, DataError, data_root, print0
from fastchat_core.training import add_run_args, setup_run


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="fastchat train eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its latest)")
    p.add_argument("--core", action="store_true", help="CORE (base models)")
    p.add_argument("--bpb", action="store_true", help="validation bits per byte")
    p.add_argument("--chat", action="store_true", help="ChatCORE (chat models)")
    p.add_argument("--max-per-task", type=int, default=None, help="evaluate at most N items per task (CORE "
                   "and ChatCORE)")
    p.add_argument("--core-tasks", default=None, help="comma-separated CORE labels (default: all with data)")
    p.add_argument("--chat-tasks", default=None, help="comma-separated ChatCORE tasks (default: all five)")
    p.add_argument("--bpb-tokens", type=int, default=1 << 20, help="validation tokens for --bpb (over all ranks)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward for --bpb")
    p.add_argument("--data", default=None, help="pretraining data for --bpb (default $FASTCHAT_DATA/pretrain); "
                   "its last file is the validation split")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one the run trained with, "
                   "else $FASTCHAT_HOME/tokenizer)")
    add_run_args(p)
    args = p.parse_args(argv)
    if args.max_per_task is not None and args.max_per_task < 1:
        p.error("--max-per-task must be >= 1")
    return args


def load_tokenizer(path, meta):
    from fastchat_core.tokenizer import get_tokenizer
    trained_with = (meta.get("args") or {}).get("tokenizer")
    if path is None and trained_with and Path(trained_with).is_file():
        path = trained_with
    try:
        return get_tokenizer(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def merge_results(run_dir: Path, new: dict) -> dict:
    """Update eval.json in run_dir with new entries (others are kept), atomically; returns the whole file."""
    path = run_dir / "eval.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(new)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    return results


def run_bpb(model, tokenizer, args, rank, world, device, autocast) -> dict:
    from fastchat_core.data import DataLoader
    from fastchat_core.eval.bpb import evaluate_bpb
    data = args.data or (data_root() / "pretrain" if data_root() else None)
    if data is None or not Path(data).exists():
        raise DataError(f"--bpb: no pretraining data at {data}: pass --data DIR or set FASTCHAT_DATA")
    B, T = args.device_batch_size, model.config.seq_len
    steps = max(1, args.bpb_tokens // (B * T * world))
    loader = DataLoader(tokenizer, data, B, T, split="val", rank=rank, world_size=world, device=device, epochs=1)
    try:
        with autocast:
            bpb = evaluate_bpb(model, itertools.islice(loader, steps), tokenizer.token_bytes().to(device))
    finally:
        loader.close()
    return {"val_bpb": bpb, "tokens": steps * B * T * world}


def run_chat(model, tokenizer, args, device) -> dict:
    try:
        from fastchat_core.eval.chat import CHATCORE_TASKS, chatcore
    except ImportError as e:
        raise ConfigError(f"--chat needs fastchat_core.eval.chat, which could not be imported ({e})") from e
    if device.type == "cuda":
        model = model.to(torch.bfloat16)  # the Engine's KV cache takes the weights' dtype
    tasks = args.chat_tasks.split(",") if args.chat_tasks else CHATCORE_TASKS
    try:
        return chatcore(model, tokenizer, tasks=tasks, max_problems=args.max_per_task)
    except ValueError as e:  # e.g. an unknown --chat-tasks name
        raise ConfigError(str(e)) from e


def print_core(res):
    print0(f"{'task':<34}{'accuracy':>10}{'centered':>10}")
    for label, r in res["tasks"].items():
        print0(f"{label:<34}{r['accuracy']:>10.4f}{r['centered']:>10.4f}")
    print0(f"{'CORE':<34}{'':>10}{res['core']:>10.4f}")
    print0(f"note: {res['note']}")


def main(argv=None):
    args = get_args(argv)
    with setup_run(args, tf32=False) as run:
        return evaluate(args, run)


def evaluate(args, run):
    rank, _, world, device = run
    ckpt = resolve_checkpoint(args.checkpoint)
    run_dir, stage = ckpt.parent, ckpt.parent.parent.name
    if not (args.core or args.bpb or args.chat):
        args.core = args.bpb = stage == "base"
        args.chat = not args.core
    model, meta = load_model(ckpt, device)
    tokenizer = load_tokenizer(args.tokenizer, meta)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the checkpoint's vocab ({model.config.vocab_size}) is not the tokenizer's "
                          f"({tokenizer.vocab_size}): pass the --tokenizer it was trained with")
    autocast = run.autocast()
    print0(f"evaluating {ckpt} ({stage}, depth {model.config.depth}, {model.num_params() / 1e6:.1f}M params)")
    where = {"checkpoint": str(ckpt), "step": meta.get("step")}

    new = {}
    if args.core:
        from fastchat_core.eval.core import evaluate_core
        t0 = time.perf_counter()
        tasks = args.core_tasks.split(",") if args.core_tasks else None
        with autocast:
            try:
                res = evaluate_core(model, tokenizer, data_root(), args.max_per_task, device, tasks)
            except ValueError as e:  # e.g. a --core-tasks label that does not exist
                raise ConfigError(str(e)) from e
        new["core"] = {**where, **res, "max_per_task": args.max_per_task, "seconds": time.perf_counter() - t0}
        print_core(res)
    if args.bpb:
        new["bpb"] = {**where, **run_bpb(model, tokenizer, args, rank, world, device, autocast)}
        print0(f"val bpb: {new['bpb']['val_bpb']:.4f} ({new['bpb']['tokens']:,} tokens)")
    if args.chat:
        res = run_chat(model, tokenizer, args, device)
        new["chatcore"] = {**where, **res}
        for name, value in res.items():
            print0(f"{'ChatCORE' if name == 'chatcore' else name:<34}{value:>10.4f}")
    if rank == 0:
        merge_results(run_dir, new)
        print0(f"wrote {run_dir / 'eval.json'}")
    return new


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat train eval"))

"""Supervised fine-tuning: `fastchat train sft` or `torchrun --nproc_per_node=N -m fastchat_core.train.sft`.

Starts from the latest midtrained model (else the latest base model) and trains on a curated mixture:
general chat, GSM8K with calculator tool calls, MMLU-style multiple choice, and generated identity, spelling
and arithmetic conversations. Without $FASTCHAT_DATA only the generated tasks are used (it says so).

One conversation per row, padded to the longest row of its batch. The loss counts only the tokens the
assistant must write (render_conversation's mask; every other target is -1) and is normalized by the number
of such tokens in the whole step over all ranks, so each trained token weighs the same whatever its row or
rank. train/mid.py runs this same loop with packed rows, a broader mixture and full learning rates.

Under torchrun rank r takes conversations r, r + N, r + 2N, ... of the mixture, and the optimizers average
the gradients inside step(). Progress line, metrics.jsonl, validation loss on held-out conversations, and a
checkpoint at the end in $FASTCHAT_HOME/<stage>/d<depth>.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastchat_core.checkpoint import load_model, newest_checkpoint, resolve_checkpoint, save_checkpoint
from fastchat_core.common import MetricsLog, add_run_args, cleanup_dist, data_root, home_dir, print0, setup_run
from fastchat_core.optim import add_optim_args, apply_schedules, build_optimizers
from fastchat_core.tasks.arithmetic import Arithmetic
from fastchat_core.tasks.base import TaskMixture
from fastchat_core.tasks.identity import Identity
from fastchat_core.tasks.spelling import Spelling, SpellingCount
from fastchat_core.tokenizer import get_tokenizer


def get_args(argv=None, stage="sft", doc=__doc__, **defaults):
    """The flags of a chat fine-tuning stage; `defaults` overrides the SFT defaults (mid.py uses it)."""
    p = argparse.ArgumentParser(prog=f"fastchat train {stage}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init-from", default=None, help="checkpoint or run folder (default: the latest run of the "
                   "stage before: $FASTCHAT_HOME/mid, else base, for sft; base for mid)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    g.add_argument("--seq-len", type=int, default=0, help="tokens per row (0 = the model's training length)")
    g = p.add_argument_group("data")
    g.add_argument("--epochs", type=int, default=1, help="passes over the mixture, each shuffled anew")
    g.add_argument("--limit", type=int, default=0, help="use only the first N conversations of the mixture "
                   "(0 = all): quick runs")
    g.add_argument("--val-conversations", type=int, default=256, help="held-out conversations for val loss")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", type=int, default=4, help="rows per rank per micro-step")
    g.add_argument("--rows-per-step", type=int, default=32, help="rows per optimizer step over all ranks "
                   "(device batch x ranks x gradient accumulation)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (default: one pass over "
                   "the rows; more cycles through them again)")
    add_optim_args(g)
    g.add_argument("--init-lr-frac", type=float, default=0.02, help="scales all learning rates: fine-tuning "
                   "starts far below pretraining's")
    g.add_argument("--warmdown-ratio", type=float, default=1.0, help="fraction of steps decaying the LR to 0")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    add_run_args(g, f"default $FASTCHAT_HOME/{stage}/d<depth>")
    g.add_argument("--eval-every", type=int, default=0, help="val loss every N steps (0 = at start and end)")
    g.add_argument("--log-every", type=int, default=1)
    p.set_defaults(**defaults)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.device_batch_size < 1 or args.rows_per_step < 1:
        p.error("--epochs, --device-batch-size and --rows-per-step must be >= 1")
    return args


def generated_tasks(seed: int, scale: int = 1):
    """Tasks built by code, needing no data files: identity, spelling, counting, arithmetic tool use."""
    return [Identity(500 * scale, seed), SpellingCount(1000 * scale, seed), Spelling(500 * scale, seed),
            Arithmetic(1000 * scale, seed)]


def sft_tasks(args):
    """(train, val) mixtures: curated chat + GSM8K + MMLU dev + generated, or generated only without data."""
    if data_root() is None:
        print0("FASTCHAT_DATA is not set: training on generated tasks only (identity, spelling, arithmetic)")
        train = TaskMixture(generated_tasks(args.seed), epochs=args.epochs, seed=args.seed)
        return train, TaskMixture(generated_tasks(args.seed + 1), seed=args.seed + 1)
    from fastchat_core.tasks.conversations import Conversations
    from fastchat_core.tasks.gsm8k import GSM8K
    from fastchat_core.tasks.mmlu import MMLU
    # SGD and Taskmaster are large and repetitive task-oriented dialogues: a quarter teaches their style.
    # The human-written instructions are few and diverse, so they go in twice; MMLU dev (285) three times.
    chat = {"sgd_dialogues": 0.25, "taskmaster4_coffee": 0.25, "self_instruct_human_written": 2.0,
            "gpteacher_codegen": 1.0}
    tasks = [Conversations(s) for s in chat] + [GSM8K("train"), MMLU("dev")] + generated_tasks(args.seed)
    weights = list(chat.values()) + [1.0, 3.0] + [1.0] * 4
    train = TaskMixture(tasks, weights, epochs=args.epochs, seed=args.seed)
    val = TaskMixture([Conversations(s, "val") for s in chat] + generated_tasks(args.seed + 1), seed=args.seed + 1)
    return train, val


def render_rows(tokenizer, task, indices, row_len: int, pack: bool):
    """Render conversations to (ids, mask) int arrays of at most row_len tokens.

    pack=False: one conversation per row. pack=True: whole conversations appended to a row while they fit
    (each starts with its own <|bos|>), so rows are nearly full. A conversation longer than a row is cut;
    one whose cut leaves nothing to learn is skipped. Returns (rows, number skipped).
    """
    rows, ids_acc, mask_acc, skipped = [], [], [], 0

    def flush():
        if ids_acc:
            rows.append((np.array(ids_acc, dtype=np.int64), np.array(mask_acc, dtype=np.bool_)))
            ids_acc.clear()
            mask_acc.clear()

    for i in indices:
        ids, mask = tokenizer.render_conversation(task[i]["messages"], max_tokens=row_len)
        if not any(mask[1:]):   # the first token is never a target
            skipped += 1
            continue
        if not pack or len(ids_acc) + len(ids) > row_len:
            flush()
        ids_acc += ids
        mask_acc += mask
    flush()
    return rows, skipped


def collate(rows, pad_id: int, width: int | None = None):
    """Inputs and targets (B, L-1) for rows padded to `width` tokens (None: the longest row). Targets are
    the next token where the mask trains it, else -1 (ignored): user turns, tool output, padding."""
    L = width or max(len(ids) for ids, _ in rows)
    x = np.full((len(rows), L - 1), pad_id, dtype=np.int64)
    y = np.full((len(rows), L - 1), -1, dtype=np.int64)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], -1)
    return torch.from_numpy(x), torch.from_numpy(y)


def train(args, make_tasks, stage: str = "sft", pack: bool = False, init_stages=("mid", "base")):
    """Fine-tune a checkpoint on the tasks `make_tasks(args) -> (train, val)` (this rank's share of each)
    and save it; returns a summary dict. The tasks load after the checkpoint and flags are checked, so a
    mistake there fails at once."""
    run = setup_run(args, seed=args.seed)
    rank, _, world, device = run

    init = args.init_from or newest_checkpoint(init_stages)
    if init is None:
        where = " or ".join(str(home_dir() / s) for s in init_stages)
        raise SystemExit(f"no checkpoint under {where}: train one first (`fastchat train {init_stages[-1]}`) "
                         "or pass --init-from DIR")
    init = resolve_checkpoint(init)
    model, meta = load_model(init, device)
    model.train()
    cfg = model.config
    tokenizer_path = args.tokenizer or meta["args"].get("tokenizer")   # None: the default location
    tokenizer = get_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} tokens but {init} was trained with "
                         f"{cfg.vocab_size}: pass the checkpoint's tokenizer with --tokenizer")
    T = args.seq_len or cfg.seq_len
    if not 8 <= T <= model.cos.size(0):
        raise SystemExit(f"--seq-len must be between 8 and {model.cos.size(0)} (4x the model's training length)")
    B = args.device_batch_size
    if args.rows_per_step % (B * world):
        raise SystemExit(f"--rows-per-step {args.rows_per_step} is not a multiple of device_batch_size*ranks = "
                         f"{B}*{world}; pick e.g. {B * world * max(1, args.rows_per_step // (B * world))}")
    accum = args.rows_per_step // (B * world)

    train_task, val_task = make_tasks(args)
    # Render this rank's share up front: the step count must be known for the LR schedule and equal on
    # every rank, and fine-tuning sets are small enough (tens of thousands of conversations) to hold.
    t0 = time.perf_counter()
    n_train = min(len(train_task), args.limit) if args.limit else len(train_task)
    rows, skipped = render_rows(tokenizer, train_task, range(rank, n_train, world), T + 1, pack)
    n_val = min(len(val_task), args.val_conversations)
    val_rows, _ = render_rows(tokenizer, val_task, range(rank, n_val, world), T + 1, pack)
    counts = torch.tensor([len(rows)], device=device)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    min_rows = int(counts.item())
    if min_rows == 0:
        raise SystemExit(f"a rank got no training rows from {n_train} conversations over {world} ranks: give "
                         "more data (--limit) or use fewer ranks")
    num_steps = args.num_iterations if args.num_iterations > 0 else max(1, min_rows // (B * accum))
    print0(f"{stage}: {init} | {n_train:,} conversations -> {len(rows):,} rows on rank 0 ({skipped} skipped: "
           f"nothing to learn within {T + 1} tokens), rendered in {time.perf_counter() - t0:.1f} s")
    print0(f"batch: {B} rows x {world} ranks x {accum} accum = {args.rows_per_step} rows/step, "
           f"{'packed' if pack else 'padded'} to {'' if pack else 'at most '}{T} tokens; {num_steps} steps; "
           f"device {device}")

    run_dir = Path(args.run_dir or home_dir() / stage / f"d{cfg.depth}")
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr * args.init_lr_frac,
                                  embedding_lr=args.embedding_lr * args.init_lr_frac,
                                  unembedding_lr=args.unembedding_lr * args.init_lr_frac,
                                  weight_decay=args.weight_decay)
    autocast = run.autocast()
    width = T + 1 if pack else None   # packed rows have one shape; padded ones the longest of the batch

    def micro_batch(k):
        """This rank's k-th micro-batch of B rows, cycling through its rows."""
        return collate([rows[(k * B + j) % len(rows)] for j in range(B)], tokenizer.bos_id, width)

    @torch.no_grad()
    def evaluate():
        """Mean loss per trained token over the held-out rows of every rank."""
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for start in range(0, len(val_rows), B):
            x, y = collate(val_rows[start:start + B], tokenizer.bos_id, width)
            x, y = x.to(device), y.to(device)
            with autocast:
                sums[0] += model(x, y, reduction="sum").double()
            sums[1] += (y >= 0).sum()
        if world > 1:
            dist.all_reduce(sums)
        model.train()
        return (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")

    with MetricsLog(run_dir / "metrics.jsonl") as log:
        for step in range(num_steps):
            if step == 0 or (args.eval_every and step % args.eval_every == 0):
                val = evaluate()
                print0(f"step {step:5d} | val loss {val:.4f}")
                log({"step": step, "val_loss": val})
            t0 = time.perf_counter()
            batches = [micro_batch(step * accum + m) for m in range(accum)]
            # Normalize by the trained tokens of the whole step on all ranks: the optimizers *average* gradients
            # over ranks, hence the factor `world`.
            n_tokens = torch.tensor(float(sum((y >= 0).sum().item() for _, y in batches)), device=device)
            if world > 1:
                dist.all_reduce(n_tokens)
            loss_sum = torch.zeros((), device=device)
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    loss = model(x, y, reduction="sum")
                (loss * world / n_tokens).backward()
                loss_sum += loss.detach()
            lr_mult = apply_schedules(optimizers, step, num_steps, warmup_steps=0, warmdown_ratio=args.warmdown_ratio)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum)
            train_loss = (loss_sum / n_tokens).item()
            dt = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                raise SystemExit(f"loss is {train_loss} at step {step + 1}: lower the learning rates (--init-lr-frac)")
            log({"step": step + 1, "loss": train_loss, "lr_mult": lr_mult, "tokens": int(n_tokens.item()), "dt": dt})
            if (step + 1) % args.log_every == 0 or step + 1 == num_steps:
                print0(f"step {step + 1:5d}/{num_steps} | loss {train_loss:.4f} | lr x{lr_mult:.3f} | "
                       f"{int(n_tokens.item()):,} trained tokens | {dt * 1000:.0f} ms")

        val = evaluate()
        print0(f"final val loss: {val:.4f}")
        log({"step": num_steps, "val_loss": val})
        run_args = dict(vars(args), init_from=str(init), tokenizer=tokenizer_path and str(tokenizer_path))
        ckpt = save_checkpoint(run_dir, num_steps, model, optimizers, None,
                               {"model_config": cfg.to_dict(), "args": run_args, "stage": stage, "val_loss": val})
        summary = {"steps": num_steps, "train_loss": train_loss, "val_loss": val, "checkpoint": str(ckpt)}
        log({"summary": summary})
        print0("summary: " + json.dumps(summary))
    cleanup_dist()
    return summary


def main(argv=None):
    args = get_args(argv, "sft")
    return train(args, sft_tasks, stage="sft", pack=False, init_stages=("mid", "base"))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Supervised fine-tuning: `fastchat train sft` or `torchrun --nproc_per_node=N -m fastchat_core.train.sft`.

Starts from the latest midtrained model (else the latest base model) and trains on a curated mixture:
general chat, GSM8K with calculator tool calls, MMLU-style multiple choice, and generated identity, spelling
and arithmetic conversations. Without $FASTCHAT_DATA only the generated tasks are used (it says so).

One conversation per row, padded to the longest row of its batch. The loss counts only the tokens the
assistant must write (render_conversation's mask; every other target is -1) and is normalized by the number
of such tokens in the whole step over all ranks, so each trained token weighs the same whatever its row or
rank. train/mid.py runs this same loop with packed rows, a broader mixture and full learning rates.

Under torchrun rank r takes conversations r, r + N, r + 2N, ... of the mixture, and the optimizers average
the gradients inside step(). Validation loss on held-out conversations; the loop around the steps (progress
line, metrics.jsonl, checkpoints in $FASTCHAT_HOME/<stage>/d<depth> with --save-every, exact --resume) is
fastchat_core.training's.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastchat_core.checkpoint import CheckpointError, load_model, newest_checkpoint, resolve_checkpoint
from fastchat_core.cli import run as run_command
from fastchat_core.common import ConfigError, data_root, home_dir, print0
from fastchat_core.optim import add_optim_args, build_optimizers, optimizer_options, schedule_options
from fastchat_core.tasks.arithmetic import Arithmetic
from fastchat_core.tasks.base import TaskMixture
from fastchat_core.tasks.identity import Identity
from fastchat_core.tasks.spelling import Spelling, SpellingCount
from fastchat_core.tokenizer import get_tokenizer
from fastchat_core.training import Trainer, accumulate, add_loop_args, add_run_args, setup_run, step_optimizers


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
    add_loop_args(g)
    g.add_argument("--eval-every", type=int, default=0, help="val loss every N steps (0 = at start and end)")
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


class RowBatches:
    """Micro-batches of B rows cycling through this rank's rendered rows; its state is how many it has served."""

    def __init__(self, rows, B, pad_id, width, state=None):
        self.rows, self.B, self.pad_id, self.width = rows, B, pad_id, width
        self.i = (state or {}).get("i", 0)

    def __iter__(self):
        return self

    def __next__(self):
        start = self.i * self.B
        self.i += 1
        return collate([self.rows[(start + j) % len(self.rows)] for j in range(self.B)], self.pad_id, self.width)

    def state_dict(self):
        return {"i": self.i}


def load_init(args, init_stages, device):
    """The checkpoint to fine-tune (--init-from, else the newest run of init_stages), its model and meta, and the
    tokenizer (--tokenizer, else the one it was trained with) with its path."""
    init = args.init_from or newest_checkpoint(init_stages)
    if init is None:
        where = " or ".join(str(home_dir() / s) for s in init_stages)
        raise CheckpointError(f"no checkpoint under {where}: train one first (`fastchat train {init_stages[-1]}`) "
                              "or pass --init-from DIR")
    init = resolve_checkpoint(init)
    model, meta = load_model(init, device)
    tokenizer_path = args.tokenizer or meta["args"].get("tokenizer")   # None: the default location
    tokenizer = get_tokenizer(tokenizer_path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but {init} was trained with "
                          f"{model.config.vocab_size}: pass the checkpoint's tokenizer with --tokenizer")
    return init, model, tokenizer, tokenizer_path


def batch_shape(args, model, world) -> tuple[int, int]:
    """(tokens per row, micro-steps per optimizer step) from the flags, checked."""
    T = args.seq_len or model.config.seq_len
    if not 8 <= T <= model.max_context:
        raise ConfigError(f"--seq-len must be between 8 and {model.max_context} (4x the model's training length)")
    B = args.device_batch_size
    if args.rows_per_step % (B * world):
        raise ConfigError(f"--rows-per-step {args.rows_per_step} is not a multiple of device_batch_size*ranks = "
                          f"{B}*{world}; pick e.g. {B * world * max(1, args.rows_per_step // (B * world))}")
    return T, args.rows_per_step // (B * world)


def render_data(args, make_tasks, tokenizer, T, pack, run):
    """This rank's share of the (train, val) rows, rendered up front: the step count must be known for the LR
    schedule and equal on every rank, and fine-tuning sets are small enough (tens of thousands of conversations)
    to hold. Returns (rows, val rows, the fewest rows any rank has, conversations used, conversations skipped)."""
    train_task, val_task = make_tasks(args)
    n_train = min(len(train_task), args.limit) if args.limit else len(train_task)
    rows, skipped = render_rows(tokenizer, train_task, range(run.rank, n_train, run.world), T + 1, pack)
    n_val = min(len(val_task), args.val_conversations)
    val_rows, _ = render_rows(tokenizer, val_task, range(run.rank, n_val, run.world), T + 1, pack)
    counts = torch.tensor([len(rows)], device=run.device)
    if run.world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    if counts.item() == 0:
        raise ConfigError(f"a rank got no training rows from {n_train} conversations over {run.world} ranks: give "
                          "more data (--limit) or use fewer ranks")
    return rows, val_rows, int(counts.item()), n_train, skipped


def train(args, make_tasks, stage: str = "sft", pack: bool = False, init_stages=("mid", "base")):
    """Fine-tune a checkpoint on the tasks `make_tasks(args) -> (train, val)` (this rank's share of each)
    and save it; returns the loop's summary. The tasks load after the checkpoint and flags are checked, so a
    mistake there fails at once."""
    with setup_run(args, seed=args.seed) as run:
        init, model, tokenizer, tokenizer_path = load_init(args, init_stages, run.device)
        model.train()
        T, accum = batch_shape(args, model, run.world)
        B, world, device = args.device_batch_size, run.world, run.device
        t0 = time.perf_counter()
        rows, val_rows, min_rows, n_train, skipped = render_data(args, make_tasks, tokenizer, T, pack, run)
        num_steps = args.num_iterations if args.num_iterations > 0 else max(1, min_rows // (B * accum))
        print0(f"{stage}: {init} | {n_train:,} conversations -> {len(rows):,} rows on rank 0 ({skipped} skipped: "
               f"nothing to learn within {T + 1} tokens), rendered in {time.perf_counter() - t0:.1f} s")
        print0(f"batch: {B} rows x {world} ranks x {accum} accum = {args.rows_per_step} rows/step, "
               f"{'packed' if pack else 'padded'} to {'' if pack else 'at most '}{T} tokens; {num_steps} steps; "
               f"device {device}")

        frac = args.init_lr_frac
        optimizers = build_optimizers(model, matrix_lr=args.matrix_lr * frac, embedding_lr=args.embedding_lr * frac,
                                      unembedding_lr=args.unembedding_lr * frac, weight_decay=args.weight_decay,
                                      **optimizer_options(args))
        run_args = dict(vars(args), init_from=str(init), tokenizer=tokenizer_path and str(tokenizer_path))
        trainer = Trainer(args, run, model, optimizers, args.run_dir or home_dir() / stage / f"d{model.config.depth}",
                          num_steps, stage=stage, meta={"model_config": model.config.to_dict(), "args": run_args},
                          warmdown_ratio=args.warmdown_ratio, flops_per_token=model.config.flops_per_token(),
                          **schedule_options(args))
        width = T + 1 if pack else None   # packed rows have one shape; padded ones the longest of the batch
        batches = RowBatches(rows, B, tokenizer.bos_id, width, trainer.resume())
        autocast = run.autocast()

        @torch.no_grad()
        def evaluate(step):
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
            return {"val_loss": (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")}

        def train_step(step):
            micro = [next(batches) for _ in range(accum)]
            # Normalize by the trained tokens of the whole step on all ranks: the optimizers *average* gradients
            # over ranks, hence the factor `world`. The tokens fed in count for tok/s.
            counts = torch.tensor([float(sum((y >= 0).sum().item() for _, y in micro)),
                                   float(sum(x.numel() for x, _ in micro))], device=device)
            if world > 1:
                dist.all_reduce(counts)
            n_tokens = counts[0]

            def loss_fn(batch):
                x, y = (t.to(device, non_blocking=True) for t in batch)
                loss = model(x, y, reduction="sum")
                return loss * world / n_tokens, loss

            loss_sum = accumulate(micro, loss_fn, autocast)
            step_optimizers(model, optimizers)
            if world > 1:
                dist.all_reduce(loss_sum)
            # one device-to-host copy for the three numbers, not three syncs
            loss, n_trained, n_fed = torch.stack([loss_sum / n_tokens, n_tokens, counts[1]]).tolist()
            return int(n_fed), {"loss": loss, "tokens": int(n_trained)}

        return trainer.fit(train_step, batches.state_dict, evaluate, args.eval_every)


def main(argv=None):
    args = get_args(argv, "sft")
    return train(args, sft_tasks, stage="sft", pack=False, init_stages=("mid", "base"))


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat train sft"))

"""The training loop every stage shares (base, mid, SFT, RL), and the drivers' run set-up.

A stage keeps what is its own (its data, its loss, its evaluations) and hands the rest to a Trainer:

    trainer = Trainer(args, run, model, optimizers, run_dir, num_steps, stage="sft", meta={...})
    data_state = trainer.resume()    # --resume: weights, optimizer, RNG, step; returns the stage's data position
    summary = trainer.fit(train_step, loader.state_dict, evaluate, eval_every)

train_step(step) makes one optimizer step, typically accumulate() over micro-batches then step_optimizers(), and
returns (tokens it processed over all ranks, {"loss": ..., the stage's other metrics}). Around it the loop sets the
step's learning rates and Muon momentum (functions of step / num_steps), times it (tokens/s, MFU, ETA), logs a
record to metrics.jsonl (and to Weights & Biases with --wandb-project), stops on a non-finite loss, prints a progress
line every --log-every steps, evaluates at step 0, every eval_every steps and at the end, and saves an atomic
checkpoint every --save-every steps and at the end. A run stopped at any point continues from its last checkpoint
with --resume as if it had never stopped: the same batches, losses and weights (bit for bit on the CPU). The process
group is destroyed however a run ends (setup_run); errors the user can fix are raised as UserError, never exits.
"""
import importlib.util
import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from fastchat_core.checkpoint import CheckpointError, resume_checkpoint, save_checkpoint
from fastchat_core.common import (ConfigError, UserError, cleanup_dist, init_dist, is_dist, print0, rank, synchronize,
                                  world_size)
from fastchat_core.optim import apply_schedules

# Dense bf16 peak of the GPUs we plan for (datasheet), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---- run set-up ----------------------------------------------------------------------------------------------

def add_run_args(group, run_dir_help: str | None = None):
    """The drivers' common flags on an argparse parser or group: --run-dir (when run_dir_help is given),
    --device and --threads."""
    if run_dir_help is not None:
        group.add_argument("--run-dir", default=None, help=run_dir_help)
    group.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    group.add_argument("--threads", type=int, default=0, help="CPU threads per process (0 = torch default)")


def add_loop_args(group):
    """The training loop's flags: checkpoints, --resume, the progress line, experiment tracking."""
    group.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end, "
                       "-1 = never: benchmarks)")
    group.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in "
                       "--run-dir (damaged ones are skipped with a warning)")
    group.add_argument("--accept-data-restart", action="store_true", help="with --resume: when the checkpoint "
                       "holds no data position, restart the data from the beginning instead of stopping")
    group.add_argument("--log-every", type=int, default=1, help="a progress line every N steps")
    group.add_argument("--time-budget", type=float, default=0, help="train for this many seconds of steps instead "
                       "of a step count (equal wall-clock comparisons; the first three steps, compilation, do not "
                       "count): the step count is fixed from the measured step time, so the schedules still end "
                       "with the budget")
    group.add_argument("--wandb-project", default=None, help="also log the metrics to this Weights & Biases "
                       "project (pip install wandb; WANDB_MODE=offline needs no account)")
    group.add_argument("--run-name", default=None, help="the Weights & Biases run name (default <stage>-<run "
                       "folder name>)")


class Run(NamedTuple):
    """Where a driver runs: its rank, local rank and world size, and its device (see setup_run)."""
    rank: int
    local_rank: int
    world: int
    device: torch.device

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


@contextmanager
def setup_run(args, seed: int | None = None, tf32: bool = True):
    """A driver's run from its add_run_args flags: CPU threads (--threads), the device (--device), torch.distributed
    under torchrun (init_dist), then torch's seed (when given) and TF32 matmuls on CUDA (when tf32). A context
    manager yielding the Run: the process group is destroyed however the block is left, an error included."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    run = Run(*init_dist(device_type))
    try:
        if seed is not None:
            torch.manual_seed(seed)
        if tf32 and run.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield run
    finally:
        cleanup_dist()


class MetricsLog:
    """Appends JSON records, one a line, to a metrics file (e.g. <run_dir>/metrics.jsonl), flushed as they come.
    Given a wandb project it logs the same numbers to Weights & Biases too: a record at its "step", the final
    {"summary": ...} as the run's summary. Only rank 0 writes. A context manager: it closes on leaving."""

    def __init__(self, path, wandb_project=None, run_name=None, config=None):
        self.file = open(path, "a") if rank() == 0 else None
        self.wandb = None
        if self.file and wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config)

    def __call__(self, rec: dict):
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.wandb is not None:
            if "summary" in rec:
                self.wandb.summary.update(_numbers(rec["summary"]))
            else:
                self.wandb.log(_numbers(rec), step=rec["step"])

    def close(self, failed: bool = False):
        if self.file:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=int(failed))
            self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)


def _numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}


# ---- the loop ------------------------------------------------------------------------------------------------

def accumulate(batches, loss_fn, autocast=nullcontext()):
    """Forward and backward over micro-batches, their gradients adding up: loss_fn(batch) -> (the loss to
    backpropagate, the loss to report), run under `autocast`. Returns the sum of the reported losses, detached
    and left on the device (no host sync)."""
    total = 0
    for batch in batches:
        with autocast:
            loss, reported = loss_fn(batch)
        loss.backward()
        total = total + reported.detach()
    return total


def step_optimizers(model, optimizers):
    """One update: every optimizer steps (each reduces its gradients across ranks inside), then gradients are freed."""
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


class DivergedError(UserError):
    """The training loss became inf or NaN."""


def _fmt(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


class Trainer:
    """The loop around a stage's train_step: see this module's docstring. `meta` goes into every checkpoint's
    meta.json, with the stage, the tokens trained on so far and the latest evaluation; warmup_steps, warmdown_ratio
    and final_frac shape the learning-rate schedule (optim.lr_multiplier), momentum (a dict for optim.muon_momentum)
    and wd_schedule Muon's (optim.apply_schedules; optim.schedule_options(args) gives the three from the flags);
    flops_per_token gives MFU on a GPU."""

    def __init__(self, args, run, model, optimizers, run_dir, num_steps, *, stage, meta, warmup_steps=0,
                 warmdown_ratio=0.2, flops_per_token=None, final_frac=0.0, momentum=None, wd_schedule="constant"):
        if args.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("--wandb-project needs the wandb package: pip install wandb (or leave the flag out)")
        self.args, self.run, self.model, self.optimizers = args, run, model, optimizers
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.num_steps, self.stage, self.meta = num_steps, stage, meta
        self.schedule = dict(warmup_steps=warmup_steps, warmdown_ratio=warmdown_ratio, final_frac=final_frac,
                             momentum=momentum, wd_schedule=wd_schedule)
        self.flops_per_token, self.peak = flops_per_token, peak_flops(run.device)
        self.step, self.tokens, self.last_eval = 0, 0, {}
        self.timed = [0.0, 0, 0]   # seconds, tokens and steps of this process after its first three (compilation)
        self.budget_set = not args.time_budget

    def resume(self):
        """With --resume: restore the newest intact checkpoint of the run folder (weights, optimizer state, random
        number generators, step, tokens so far) and return its data state for the stage's loader. None without
        --resume, or with --accept-data-restart when the checkpoint holds none (the data starts over)."""
        if not self.args.resume:
            return None
        try:
            ckpt, meta, data_state = resume_checkpoint(self.run_dir, self.model, self.optimizers, self.run.device)
        except CheckpointError as e:
            raise type(e)(f"--resume: {e}") from e
        if data_state is None:  # silently starting the data over would train on its first examples again
            if not self.args.accept_data_restart:
                raise CheckpointError(f"--resume: {ckpt} holds no data loader position (loader_rank*.json): restore "
                                      "it, or pass --accept-data-restart to restart the data from the beginning")
            print0(f"--accept-data-restart: {ckpt} holds no data loader position; the data restarts from the start")
        self.step, self.tokens = meta["step"], meta.get("tokens", 0)
        print0(f"resumed from {ckpt} at step {self.step}")
        return data_state

    def fit(self, train_step, data_state, evaluate=None, eval_every: int = 0) -> dict:
        """Train from the current step to num_steps. data_state() is the stage's data position to checkpoint;
        evaluate(step) -> {metric: value} runs at step 0, every eval_every steps (0: none between) and at the end.
        Returns the summary (also logged and printed): steps, the last train loss, tokens/s and MFU over the timed
        steps, the last evaluation's metrics, the final checkpoint."""
        self.data_state, start, loss, ckpt = data_state, self.step, None, None
        name = self.args.run_name or f"{self.stage}-{self.run_dir.name}"
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.args.wandb_project, name, vars(self.args))
        with self.log:
            while self.step < self.num_steps:
                if evaluate is not None and (self.step == 0 or eval_every and self.step % eval_every == 0):
                    self._evaluate(evaluate)
                loss = self._train_step(train_step, first=self.step - start < 3)
                if not self.budget_set and self.timed[2] >= 5:
                    self._fit_budget()
                if 0 < self.args.save_every and self.step % self.args.save_every == 0 and self.step < self.num_steps:
                    self.save()
            if evaluate is not None:
                self._evaluate(evaluate)
            if self.args.save_every >= 0:
                ckpt = self.save()
            summary = self._summary(loss, ckpt)
            self.log({"summary": summary})
        print0("summary: " + json.dumps(summary))
        return summary

    def _fit_budget(self):
        """--time-budget: the steps left are what the remaining seconds allow at the measured step time (rank 0's
        estimate, so every rank stops at the same step)."""
        seconds, _, steps = self.timed
        # on the run's device: NCCL, the group of CUDA runs, broadcasts only device tensors
        left = torch.tensor([max(0, int((self.args.time_budget - seconds) / (seconds / steps)))], device=self.run.device)
        if is_dist():
            torch.distributed.broadcast(left, 0)
        self.num_steps, self.budget_set = self.step + int(left), True
        print0(f"--time-budget {self.args.time_budget:g} s: {self.num_steps} steps in all")

    def save(self) -> Path:
        """An atomic checkpoint of the current step (collective under torchrun)."""
        meta = dict(self.meta, stage=self.stage, tokens=self.tokens, eval=self.last_eval or None)
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizers, self.data_state(), meta)

    def _train_step(self, train_step, first: bool) -> float:
        synchronize(self.run.device)
        t0 = time.perf_counter()
        lr_mult = apply_schedules(self.optimizers, self.step, self.num_steps, **self.schedule)
        tokens, metrics = train_step(self.step)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens += tokens
        if not first:
            self.timed = [self.timed[0] + dt, self.timed[1] + tokens, self.timed[2] + 1]
        rec = {"step": self.step, **metrics, "lr_mult": lr_mult, "dt": dt, "tok_per_s": tokens / dt,
               "mfu": self._mfu(tokens / dt)}
        self.log(rec)
        loss = metrics["loss"]
        if not math.isfinite(loss):
            raise DivergedError(f"loss is {loss} at step {self.step}: lower the learning rates (--matrix-lr, "
                                "--embedding-lr, --unembedding-lr) or check the data")
        if self.step % self.args.log_every == 0 or self.step == self.num_steps:
            self._progress(metrics, rec)
        return loss

    def _progress(self, metrics, rec):
        seconds, _, steps = self.timed
        eta = (self.num_steps - self.step) * (seconds / steps if steps else rec["dt"])
        mfu = f" | MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] else ""
        print0(f"step {self.step:5d}/{self.num_steps} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
               + f" | lr x{rec['lr_mult']:.3f} | {rec['dt'] * 1000:.0f} ms | {rec['tok_per_s']:,.0f} tok/s{mfu} | "
               f"ETA {eta / 60:.1f} min")

    def _evaluate(self, evaluate):
        self.last_eval = {"step": self.step, "train_seconds": self.timed[0], **evaluate(self.step)}
        self.log(self.last_eval)
        print0(f"step {self.step:5d} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in _numbers(self.last_eval).items()))

    def _mfu(self, tokens_per_s):
        if not (self.flops_per_token and self.peak):
            return None
        return self.flops_per_token * tokens_per_s / (self.peak * world_size())

    def _summary(self, loss, ckpt) -> dict:
        seconds, tokens, _ = self.timed
        tokens_per_s = tokens / seconds if seconds else None
        summary = {"steps": self.step, "train_loss": loss, "tokens_per_s": tokens_per_s,
                   "train_seconds": seconds}
        if tokens_per_s and self._mfu(tokens_per_s):
            summary["mfu"] = self._mfu(tokens_per_s)
        summary.update((k, v) for k, v in self.last_eval.items() if k != "step")
        if ckpt is not None:
            summary["checkpoint"] = str(ckpt)
        if self.run.device.type == "cuda":
            summary["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return summary

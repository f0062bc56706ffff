"""The training loop every stage shares (fastchat_core.training): the helpers the stages' crash-and-resume tests use,
the random generators coming back on resume, the non-finite loss guard, the process group destroyed on every exit,
Weights & Biases logging what metrics.jsonl holds, and user errors: typed in library code, printed without a
traceback by the commands, naming only flags that exist."""
import argparse
import ast
import contextlib
import json
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastchat_core
from conftest import tiny_gpt
from fastchat_core import cli, training
from fastchat_core.checkpoint import resume_checkpoint, save_checkpoint
from fastchat_core.common import ConfigError
from fastchat_core.optim import build_optimizers
from fastchat_core.tasks.base import ListTask
from fastchat_core.train import base, eval as evaluate, rl, sft

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(Exception):
    """Stands for the process being killed."""


@contextlib.contextmanager
def dies_in_step(step: int):
    """A training run in this block dies as it starts step `step` (1-based, as metrics.jsonl numbers them), after
    every checkpoint before it, as a killed process would."""
    real = training.apply_schedules

    def schedules(optimizers, at, *args, **kwargs):   # the loop calls it first thing in each step
        if at + 1 == step:
            raise Crash
        return real(optimizers, at, *args, **kwargs)

    training.apply_schedules = schedules
    try:
        with pytest.raises(Crash):
            yield
    finally:
        training.apply_schedules = real


def by_step(run_dir, key) -> dict:
    """{step: value} of one metric in a run's metrics.jsonl; a resumed run logs some steps twice: the last wins."""
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def assert_same_run(ref, run, keys):
    """`run` (killed and resumed) ended exactly as `ref` (never stopped): every logged value of `keys`, the final
    weights, optimizer state and data position, bit for bit."""
    for key in keys:
        assert by_step(run, key) == by_step(ref, key), key
    final = (Path(ref) / "latest").read_text().strip()
    assert (Path(run) / "latest").read_text().strip() == final
    ref, run = Path(ref) / final, Path(run) / final
    want, got = torch.load(ref / "model.pt", weights_only=True), torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(torch.load(run / "optim_rank0.pt", weights_only=False),
                               torch.load(ref / "optim_rank0.pt", weights_only=False), rtol=0, atol=0)
    assert (run / "loader_rank0.json").read_text() == (ref / "loader_rank0.json").read_text()


def loop_args(*argv):
    p = argparse.ArgumentParser()
    training.add_loop_args(p)
    return p.parse_args(argv)


def test_resume_restores_the_random_generators(tmp_path):
    model = tiny_gpt(64)
    optimizers = build_optimizers(model)
    save_checkpoint(tmp_path, 1, model, optimizers, {"i": 1}, {"model_config": model.config.to_dict()})
    draws = torch.rand(4)
    torch.manual_seed(1234)
    resume_checkpoint(tmp_path, model, optimizers)
    assert torch.equal(torch.rand(4), draws)


def test_a_non_finite_loss_stops_the_run_naming_the_flags(tmp_path):
    model = tiny_gpt(64)
    run = training.Run(0, 0, 1, torch.device("cpu"))
    trainer = training.Trainer(loop_args(), run, model, build_optimizers(model), tmp_path, 5, stage="test", meta={})
    losses = iter([2.0, float("nan")])
    with pytest.raises(training.DivergedError, match=r"loss is nan at step 2: lower the learning rates "
                                                     r"\(--matrix-lr, --embedding-lr, --unembedding-lr\)"):
        trainer.fit(lambda step: (8, {"loss": next(losses)}), dict)
    assert list(by_step(tmp_path, "loss")) == [1, 2]   # the bad step is logged, then the run stops unsaved
    assert not list(tmp_path.glob("step_*"))


def test_the_process_group_is_destroyed_when_a_run_fails(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    started, inits = dist.init_process_group, []
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: inits.append(started(*a, **k)))
    with pytest.raises(ConfigError, match="not a multiple"):   # found after the process group is up
        base.main(["--depth=1", "--seq-len=64", "--random-data", "--vocab-size=64", "--total-batch-size=300",
                   "--device=cpu", f"--run-dir={tmp_path}"])
    assert inits and not dist.is_initialized()


# ---- Weights & Biases ------------------------------------------------------------------------------------------

def tiny_sft(run_dir, *flags):
    """A 3-step fine-tuning run of the random tiny base model in `home`, on four conversations."""
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("Name?", "fastchat-core."), ("Spell cat.", "c-a-t"), ("2 + 2?", "4."), ("Hi.", "hi!")]]
    args = sft.get_args(["--device=cpu", "--device-batch-size=4", "--rows-per-step=4", "--num-iterations=3",
                         "--eval-every=2", "--init-lr-frac=0.5", f"--run-dir={run_dir}", *flags])
    return sft.train(args, lambda args: (ListTask(convs), ListTask(convs)))


@pytest.fixture()
def home(tmp_path, monkeypatch, tokenizer_file, tok):
    from conftest import save_tiny_run
    model = tiny_gpt(tok.vocab_size, seq_len=128, seed=None, init_seed=0, noise=0)
    save_tiny_run(tmp_path / "home" / "base" / "d1", model, 0, tokenizer=tokenizer_file)
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    return tmp_path


def wandb_records(path):
    """The protobuf records of a .wandb file, a LevelDB-style log: after a 7-byte header, 32 KiB blocks of
    [crc32, length, type] + data, type 1 a whole record, 2-4 its first, middle and last pieces."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pieces = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:   # the zero padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):   # still being written
            return
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""


def wandb_history(wandb_dir) -> dict:
    """{step: {key: value}} of the one offline run under wandb_dir. wandb's own process writes the file and may
    finish a moment after run.finish() returns: wait for the run's exit record."""
    [path] = Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.time() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.time() < deadline, f"{path} has no exit record"
        time.sleep(0.1)
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
    return history


def test_wandb_logs_the_metrics_of_metrics_jsonl(home):
    pytest.importorskip("wandb")
    tiny_sft(home / "plain")
    assert not list((home / "wandb").iterdir())   # without --wandb-project nothing goes to wandb
    summary = tiny_sft(home / "tracked", "--wandb-project=fastchat-test", "--run-name=tiny")
    history = wandb_history(home / "wandb")
    recs = [json.loads(line) for line in (home / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 2, 3]
    for rec in recs[:-1]:   # every record at its step: train steps, and evaluations (at the same step as a train one)
        for key, value in rec.items():
            if key != "step" and value is not None:
                assert history[rec["step"]][key] == pytest.approx(value, rel=1e-12), (rec["step"], key)
    assert recs[-1] == {"summary": summary}


def test_wandb_project_without_wandb_is_a_clear_error(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if not installed
    with pytest.raises(ConfigError, match="--wandb-project needs the wandb package: pip install wandb"):
        tiny_sft(home / "run", "--wandb-project=x")
    assert not (home / "run" / "metrics.jsonl").exists()   # stopped before training


# ---- user errors ----------------------------------------------------------------------------------------------

def test_commands_print_user_errors_without_a_traceback(tmp_path, capsys):
    bad = ["--depth=1", "--seq-len=64", "--random-data", "--vocab-size=64", "--total-batch-size=300", "--device=cpu",
           f"--run-dir={tmp_path}"]
    assert cli.main(["train", "base", *bad]) == 1
    assert capsys.readouterr().err.startswith("fastchat train base: error: --total-batch-size 300 is not a multiple")
    p = subprocess.run([sys.executable, "-m", "fastchat_core.train.sft", f"--init-from={tmp_path}/nope",
                        "--device=cpu"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert p.stderr.startswith(f"fastchat train sft: error: no checkpoint at {tmp_path}/nope")
    assert "Traceback" not in p.stderr


def _raises(tree):
    """The `raise` statements and `parser.error(...)` calls of a module's AST."""
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Raise) or isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "error"]


def test_library_code_raises_instead_of_exiting():
    """Under fastchat_core/ only the command modules and main() functions end the process."""
    package = Path(fastchat_core.__file__).parent
    commands = {"cli.py", "chat_cli.py"}   # `fastchat` and `fastchat chat`: they are the command line
    found = []
    for path in package.rglob("*.py"):
        if path.name in commands:
            continue
        tree = ast.parse(path.read_text())
        mains = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "main"
                 for n in ast.walk(f)}
        found += [f"{path.relative_to(package)}:{node.lineno}" for node in _raises(tree)
                  if "SystemExit" in ast.unparse(node) and id(node) not in mains]
    assert not found


FLAG = re.compile(r"--[a-z][a-z0-9_-]*")


@pytest.mark.parametrize("driver", [base, sft, rl, evaluate], ids=["base", "sft", "rl", "eval"])
def test_every_flag_an_error_names_exists(driver, capsys):
    """Each --flag in an error the driver (or, for the training stages, the loop, checkpoints and run set-up) can
    raise is one of its own flags (or torchrun's)."""
    with pytest.raises(SystemExit):
        driver.get_args(["--help"])
    flags = set(FLAG.findall(capsys.readouterr().out)) | {"--nproc_per_node"}
    sources = [Path(driver.__file__)]
    if driver is not evaluate:
        sources += [REPO / "fastchat_core" / name for name in ("training.py", "checkpoint.py", "common.py")]
    named = set()
    for src in sources:
        for node in _raises(ast.parse(src.read_text())):
            texts = [t.value for t in ast.walk(node) if isinstance(t, ast.Constant) and isinstance(t.value, str)]
            named |= {(src.name, node.lineno, flag) for text in texts for flag in FLAG.findall(text)}
    assert named and not {n for n in named if n[2] not in flags}


def test_time_budget_fixes_the_step_count_from_the_measured_step_time(tmp_path):
    """--time-budget: after five timed steps the loop sets the step count the remaining seconds allow at that
    pace; the run then stops there and its schedule ends with it (the last step has the final LR)."""
    model = tiny_gpt(64)
    run = training.Run(0, 0, 1, torch.device("cpu"))
    trainer = training.Trainer(loop_args("--time-budget", "0.5", "--save-every", "-1"), run, model,
                               build_optimizers(model), tmp_path, 10**6, stage="test", meta={})

    def step(i):
        time.sleep(0.01)
        return 8, {"loss": 1.0}

    summary = trainer.fit(step, dict)
    assert 20 <= summary["steps"] <= 60 and summary["steps"] == trainer.num_steps
    assert 0.4 < summary["train_seconds"] < 0.8
    lr = by_step(tmp_path, "lr_mult")
    assert lr[summary["steps"]] < lr[1]   # warmdown reached the end of the budget, not of 10**6 steps

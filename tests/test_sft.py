"""Chat fine-tuning drivers: rows and targets, the masked loss falling, the mid -> sft chain through
$FASTCHAT_HOME, the generated-only fallback, clear errors, 2 ranks == 1 rank, and exact resume after a crash."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny_run, tiny_gpt
from fastchat_core.checkpoint import CheckpointError, load_model
from fastchat_core.common import ConfigError
from fastchat_core.optim import build_optimizers
from fastchat_core.tasks.base import ListTask
from fastchat_core.tasks.gsm8k import gsm8k_conversation
from fastchat_core.train import mid, sft
from test_training import assert_same_run, dies_in_step

TINY = ["--device=cpu", "--threads=1", "--device-batch-size=4", "--rows-per-step=8", "--val-conversations=16"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def home(tmp_path_factory, tokenizer_file, tok):
    """A $FASTCHAT_HOME holding one tiny base run (random init), as `fastchat train base` would leave it."""
    home = tmp_path_factory.mktemp("home")
    model = tiny_gpt(tok.vocab_size, seq_len=128, seed=None, init_seed=0, noise=0)
    save_tiny_run(home / "base" / "d1", model, 0, tokenizer=tokenizer_file, optimizers=build_optimizers(model))
    return home


@pytest.fixture()
def env(monkeypatch, home):
    monkeypatch.setenv("FASTCHAT_HOME", str(home))
    return monkeypatch


def test_rows_and_targets(tok):
    solution = "Half of 48 is 48/2 = <<48/2=24>>24.\n#### 24"
    convs = [gsm8k_conversation("Natalia has 48 clips and sells half. How many are left?", solution),
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
             {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "ok"}]}]
    task = ListTask(convs * 3)
    rendered = [tok.render_conversation(c["messages"], max_tokens=65) for c in convs]

    rows, skipped = sft.render_rows(tok, task, range(len(task)), 65, pack=False)
    assert skipped == 3   # the long user turn fills the row: nothing left to learn
    assert [(r[0].tolist(), r[1].tolist()) for r in rows] == [tuple(map(list, rendered[i])) for i in (0, 1) * 3]
    x, y = sft.collate(rows[:2], tok.bos_id)
    ids, mask = rendered[0]
    assert x.shape == (2, len(ids) - 1)
    for t in range(len(ids) - 1):   # the target of position t is token t+1, when the mask trains it
        assert x[0, t] == ids[t]
        assert y[0, t] == (ids[t + 1] if mask[t + 1] else -1)
    n1 = len(rendered[1][0]) - 1
    assert (y[1, n1:] == -1).all() and (x[1, n1:] == tok.bos_id).all()   # padding is never trained
    # tool output is not trained; the tool call is
    out_start, py_start = tok.encode_special("<|output_start|>"), tok.encode_special("<|python_start|>")
    assert (y[0] == py_start).any() and not (y[0] == out_start).any()

    # packing: whole conversations (each after its own <|bos|>) while they fit a row of 128
    lengths = [len(tok.render_conversation(c["messages"], max_tokens=128)[0]) for c in convs[:2]]
    assert sum(lengths) <= 128 < 2 * sum(lengths)
    packed, _ = sft.render_rows(tok, task, range(len(task)), 128, pack=True)
    assert [len(ids) for ids, _ in packed] == [sum(lengths)] * 3
    flat = [t for ids, _ in packed for t in ids.tolist()]
    assert flat == [t for i in (0, 1) * 3 for t in tok.render_conversation(convs[i]["messages"])[0]]
    x, y = sft.collate(packed, tok.bos_id, width=128)
    assert x.shape == (3, 127) and (y[:, sum(lengths) - 1:] == -1).all()


def test_masked_loss_falls_on_a_tiny_set(env, tmp_path, tok):
    convs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("What is your name?", "I am fastchat-core."), ("Spell cat.", "c-a-t"),
                          ("2 + 2?", "4, of course."), ("Say hi.", "hi there!")]]
    task = ListTask(convs)
    args = sft.get_args(TINY + ["--num-iterations=40", "--init-lr-frac=0.5", f"--run-dir={tmp_path}"])
    summary = sft.train(args, lambda args: (task, task))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    train = [r["loss"] for r in recs if "loss" in r]
    assert len(train) == 40 and summary["val_loss"] == val[-1]
    assert val[-1] < 0.5 * val[0], val
    assert sum(train[-5:]) / 5 < 0.5 * train[0]
    # the loss is over assistant tokens only: a step (each of the 4 rows twice) trains exactly theirs
    assistant_tokens = sum(sum(tok.render_conversation(c["messages"])[1][1:]) for c in convs)
    assert {r["tokens"] for r in recs if "tokens" in r} == {2 * assistant_tokens}


def test_mid_then_sft_through_fastchat_home(env, home, data_dir, capsys):
    s = mid.main(TINY + ["--num-iterations=3", "--limit=48"])
    out = capsys.readouterr().out
    assert "packed to 128 tokens" in out and str(home / "base" / "d1") in out   # default init: the base run
    assert Path(s["checkpoint"]).parent == home / "mid" / "d1"
    s = sft.main(TINY + ["--num-iterations=2", "--limit=32"])
    out = capsys.readouterr().out
    assert str(home / "mid" / "d1") in out                                    # default init: the mid run
    model, meta = load_model(home / "sft" / "d1")
    assert meta["stage"] == "sft" and meta["step"] == 2 and meta["args"]["tokenizer"]
    assert model.config.depth == 1


def test_generated_tasks_without_data(env, tmp_path, capsys):
    env.delenv("FASTCHAT_DATA", raising=False)
    s = sft.main(TINY + ["--num-iterations=2", "--limit=16", f"--run-dir={tmp_path}"])
    assert "generated tasks only" in capsys.readouterr().out
    assert (Path(s["checkpoint"]) / "model.pt").exists()


def test_clear_errors(monkeypatch, tmp_path, home):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        mid.main(TINY)
    monkeypatch.setenv("FASTCHAT_HOME", str(home))
    with pytest.raises(ConfigError, match="not a multiple"):
        sft.main(TINY + ["--rows-per-step=6"])
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        sft.main(TINY + [f"--init-from={tmp_path}/nope"])


def test_two_ranks_equal_one_rank(env, home, tokenizer_file, tmp_path):
    """Rank r takes conversations r, r+2, ...; the step's loss is normalized over both ranks' tokens, so
    2 ranks x 1 micro-batch train exactly like 1 rank x 2 micro-batches (up to float rounding)."""
    env.delenv("FASTCHAT_DATA", raising=False)
    flags = ["--num-iterations=3", "--limit=48", "--val-conversations=8", "--device=cpu", "--threads=1",
             "--init-lr-frac=0.5", "--device-batch-size=4", "--rows-per-step=8",
             f"--init-from={home / 'base' / 'd1'}", f"--tokenizer={tokenizer_file}"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "fastchat_core.train.sft", *flags, f"--run-dir={tmp_path}/two"],
                           env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    sft.main(flags + [f"--run-dir={tmp_path}/one"])   # in this process, while the two ranks run
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out
    assert "4 rows x 2 ranks x 1 accum" in out

    def curve(run, key):
        recs = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in recs if key in r]
    # The logged losses and the final val loss (over both ranks' halves of the val set) must agree. Model
    # weights are not compared element-wise: Muon's bf16 Newton-Schulz turns rounding-level differences in
    # the first nonzero gradients of the zero-initialized blocks into percent-level ones, even between two
    # single-process runs that only group micro-batches differently.
    assert len(curve("one", "loss")) == 3
    assert curve("one", "loss") == pytest.approx(curve("two", "loss"), rel=1e-5)
    assert curve("one", "val_loss") == pytest.approx(curve("two", "val_loss"), rel=1e-5)


@pytest.mark.parametrize("stage", [mid, sft], ids=["mid", "sft"])
def test_resume_after_a_crash_continues_exactly(env, home, tokenizer_file, tmp_path, stage):
    """Killed in step 5 after its step-3 checkpoint, then --resume: the run ends exactly as one that never
    stopped (the same losses, val losses, weights, optimizer state and data position), so model, optimizer, RNG,
    data position and step all came back."""
    env.delenv("FASTCHAT_DATA", raising=False)   # the generated tasks: no data files to read
    flags = TINY + ["--num-iterations=8", "--limit=64", "--eval-every=3", "--save-every=3", "--init-lr-frac=0.5",
                    f"--init-from={home / 'base' / 'd1'}", f"--tokenizer={tokenizer_file}"]
    stage.main(flags + [f"--run-dir={tmp_path / 'ref'}"])
    with dies_in_step(5):
        stage.main(flags + [f"--run-dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "latest").read_text() == "step_000003"
    stage.main(flags + [f"--run-dir={tmp_path / 'run'}", "--resume"])
    assert_same_run(tmp_path / "ref", tmp_path / "run", ["loss", "tokens", "val_loss"])
    assert json.loads((tmp_path / "run" / "step_000008" / "loader_rank0.json").read_text()) == {"i": 16}

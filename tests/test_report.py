"""The report card, from a fake run root laid out as the drivers leave it."""
import json
import sys
from pathlib import Path

import pytest

from fastchat_core import cli, report
from fastchat_core.config import ModelConfig
from fastchat_core.tokenizer import Tokenizer

CFG = ModelConfig(depth=2, vocab_size=300, seq_len=64, dim=64, head_dim=32)


def write_jsonl(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_checkpoint(run_dir: Path, step: int, **meta):
    ckpt = run_dir / f"step_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"model_config": CFG.to_dict(), "step": step, **meta}))
    (run_dir / "latest").write_text(ckpt.name)


@pytest.fixture
def run_root(tmp_path):
    root = tmp_path / "home"
    Tokenizer.train_from_iterator(["hello world, a tiny corpus"] * 20, vocab_size=300).save(
        root / "tokenizer" / "tokenizer.json")
    base = root / "base" / "d2"
    # steps 1-4, then a crash and a resume that logs steps 3-4 again: 6 step records of 300 s each
    train = [{"step": s, "loss": 5.0 - s, "dt": 300.0, "tok_per_s": 1e5, "mfu": 0.4} for s in (1, 2, 3, 4)]
    resumed = [{"step": 3, "loss": 1.5, "dt": 300.0}, {"step": 4, "loss": 0.5, "dt": 300.0}]
    evals = [{"step": 0, "val_bpb": 3.0}, {"step": 2, "val_bpb": 2.0}, {"step": 4, "val_bpb": 1.5}]
    write_jsonl(base / "metrics.jsonl", evals[:2] + train + resumed + evals[2:] + [{"summary": {"steps": 4}}])
    write_checkpoint(base, 4, world_size=2, tokens=4096)
    (base / "eval.json").write_text(json.dumps({
        "core": {"step": 4, "core": 0.125, "note": "CORE over 2 of 22 tasks",
                 "tasks": {"copa": {"accuracy": 0.6, "centered": 0.2},
                           "arc_easy": {"accuracy": 0.25, "centered": 0.0}}},
        "bpb": {"step": 4, "val_bpb": 1.4375, "tokens": 1024}}))
    sft = root / "sft" / "d2"
    write_jsonl(sft / "metrics.jsonl", [{"step": s, "loss": 2.0 / s, "dt": 60.0} for s in (1, 2, 3)])
    write_checkpoint(sft, 3)
    (sft / "eval.json").write_text(json.dumps({"chatcore": {
        "checkpoint": str(sft / "step_000003"), "step": 3, "arc_easy": 0.375, "gsm8k": 0.03125, "chatcore": 0.0625}}))
    rl = root / "rl" / "d2"
    write_jsonl(rl / "metrics.jsonl", [{"step": s, "reward": 0.25 * s, "pass@4": 0.5, "loss": 0.1, "dt": 120.0,
                                        "lrm": 1.0} for s in (1, 2)] + [{"step": 2, "eval_pass@4": 0.75}])
    return root


def table_row(md: str, first_cells: str) -> list[str]:
    """The cells of the one table row starting with `first_cells` (e.g. '| base | d2 |')."""
    rows = [line for line in md.splitlines() if line.startswith(first_cells)]
    assert len(rows) == 1, (first_cells, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_stage_table_time_cost_and_missing_stages(run_root, tmp_path):
    md = report.build_report(run_root, tmp_path / "out" / "report.md", gpu_hour_cost=2.0)
    assert (tmp_path / "out" / "report.md").read_text() == md
    # 6 x 300 s on 2 GPUs at $2/GPU-hour = $2.00; every logged step counts, the resumed ones too
    assert table_row(md, "| base |") == ["base", "d2", "4", "4,096", f"{CFG.num_params():,}", "2", "30m00s", "$2.00"]
    assert table_row(md, "| sft |") == ["sft", "d2", "3", "—", f"{CFG.num_params():,}", "1", "3m00s", "$0.10"]
    assert table_row(md, "| rl |")[:3] == ["rl", "d2", "2"]  # no checkpoint: no parameter count, 1 GPU
    assert table_row(md, "| rl |")[4:] == ["—", "1", "4m00s", "$0.13"]
    assert table_row(md, "| mid |")[:2] == ["mid", "not run"]
    vocab = Tokenizer.load(run_root / "tokenizer" / "tokenizer.json").vocab_size
    assert table_row(md, "| tokenizer |")[:5] == ["tokenizer", "tokenizer.json", "—", "—", f"vocab {vocab:,}"]
    assert table_row(md, "| **total** |")[-2:] == ["37m00s", "$2.23"]
    for key in ("python", "torch", "device", "git commit"):
        assert table_row(md, f"| {key} |")[1]


def test_speedrun_stage_times_from_the_markers(run_root, tmp_path):
    marks = run_root / "speedrun" / "tiny"
    marks.mkdir(parents=True)
    for name, seconds, finished in (("base", 90.0, 2.0), ("tokenizer", 8.0, 1.0), ("eval_base", 30.4, 3.0)):
        (marks / f"{name}.done").write_text(json.dumps({"seconds": seconds, "finished": finished}))
    md = report.build_report(run_root, tmp_path / "report.md")
    assert table_row(md, "| preset |") == ["preset", "tokenizer", "base", "eval_base", "total"]  # in run order
    assert table_row(md, "| tiny |") == ["tiny", "0m08s", "1m30s", "0m30s", "2m08s"]
    lines = md.splitlines()
    assert lines[lines.index(next(x for x in lines if x.startswith("| preset |"))) + 1] == "|" + " --- |" * 5


def test_one_metrics_table_for_all_stages(run_root, tmp_path):
    md = report.build_report(run_root, tmp_path / "report.md")
    assert table_row(md, "| metric |") == ["metric", "base/d2", "sft/d2", "rl/d2"]
    assert table_row(md, "| val bpb |") == ["val bpb", "1.4375", "—", "—"]  # eval.json wins over metrics.jsonl
    assert table_row(md, "| CORE |") == ["CORE", "0.1250", "—", "—"]
    assert table_row(md, "| ChatCORE arc_easy |") == ["ChatCORE arc_easy", "—", "0.3750", "—"]
    assert table_row(md, "| ChatCORE gsm8k |")[2] == "0.0312"
    assert table_row(md, "| ChatCORE |")[2] == "0.0625"
    assert table_row(md, "| reward |") == ["reward", "—", "—", "0.5000"]
    assert table_row(md, "| eval_pass@4 |")[3] == "0.7500"
    assert "| lrm |" not in md and "| dt |" not in md  # run bookkeeping, not model metrics
    assert table_row(md, "| copa |") == ["copa", "0.6000", "0.2000"]  # CORE per task
    assert "CORE over 2 of 22 tasks" in md


def test_loss_curves_are_png_files_linked_relatively(run_root, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "card" / "report.md"
    md = report.build_report(run_root, out)
    links = [line for line in md.splitlines() if line.startswith("![")]
    assert links == ["![base/d2](plots/base_d2.png)", "![sft/d2](plots/sft_d2.png)", "![rl/d2](plots/rl_d2.png)"]
    for name in ("base_d2", "sft_d2", "rl_d2"):
        png = out.parent / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_resumed_steps_keep_the_last_value(run_root):
    s = report.summarize_run(run_root / "base" / "d2")
    assert s["series"]["loss"] == [(1, 4.0), (2, 3.0), (3, 1.5), (4, 0.5)]
    assert s["series"]["val_bpb"] == [(0, 3.0), (2, 2.0), (4, 1.5)]
    assert s["wall_s"] == 1800.0


def test_without_matplotlib_plots_are_skipped_with_a_note(run_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    md = report.build_report(run_root, tmp_path / "report.md")
    assert "Plots skipped: matplotlib is not installed" in md and "![" not in md
    assert not (tmp_path / "plots").exists()


def test_empty_run_root_and_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.md"
    assert cli.main(["report", "--run-root", str(tmp_path / "empty"), "--out", str(out)]) == 0
    md = out.read_text()
    for stage in report.STAGES:
        assert table_row(md, f"| {stage} |")[1] == "not run"
    assert "No metrics yet" in md and f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="is not a folder"):
        report.main(["--run-root", str(tmp_path / "nope")])

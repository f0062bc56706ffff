"""The report card: `fastchat report [--run-root DIR] [--out FILE] [--gpu-hour-cost USD]`.

Reads what the stages left under the run root ($FASTCHAT_HOME): tokenizer/tokenizer.json, and for each of
base, mid, sft and rl every run folder <stage>/<name>/ with its metrics.jsonl (one JSON record per line, as
the drivers log them), latest checkpoint (meta.json) and eval.json (from `fastchat train eval`). Writes one
markdown file with the environment, time and cost per stage, every metric per stage in one table, CORE per
task, and loss curves as PNG files beside it (when matplotlib is installed).
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fastchat_core.checkpoint import latest_checkpoint, load_meta
from fastchat_core.common import git_commit, home_dir

STAGES = ("tokenizer", "base", "mid", "sft", "rl")
MODEL_STAGES = STAGES[1:]
# metrics.jsonl keys reported as results (last value) and plotted, besides the training loss; the rest (dt,
# tok_per_s, mfu, lrm, ...) describe the run, not the model
METRIC_WORDS = ("val", "bpb", "reward", "pass@", "acc")
EVAL_KEYS = ("checkpoint", "step", "seconds", "max_per_task", "note", "missing")


def environment() -> dict:
    """Where this report was written: Python, torch, the accelerator, the git commit of this code."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU only ({os.cpu_count()} cores, {platform.machine()})"
    return {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "platform": platform.platform(), "git commit": git_commit()}


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _is_metric(key: str) -> bool:
    return any(w in key for w in METRIC_WORDS)


def summarize_run(run_dir: Path) -> dict:
    """What the report shows of one run folder."""
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if isinstance(r.get("step"), (int, float))]
    series = {}  # key -> {step: value}; a resumed run logs some steps twice, the last value wins
    for r in steps:
        for k, v in r.items():
            if isinstance(v, (int, float)) and (k == "loss" or _is_metric(k)):
                series.setdefault(k, {})[r["step"]] = v
    ckpt = latest_checkpoint(run_dir)
    meta = load_meta(ckpt) if ckpt is not None else {}
    params = None
    if "model_config" in meta:
        from fastchat_core.config import ModelConfig
        params = ModelConfig(**meta["model_config"]).num_params()
    eval_path = run_dir / "eval.json"
    evals = json.loads(eval_path.read_text()) if eval_path.exists() else {}

    metrics = {}
    if "bpb" in evals:
        metrics["val bpb"] = evals["bpb"]["val_bpb"]
    if "core" in evals:
        metrics["CORE"] = evals["core"]["core"]
    if "chatcore" in evals:
        metrics.update(_chat_rows(evals["chatcore"]))
    for k, by_step in series.items():
        label = "val bpb" if k == "val_bpb" else k
        if k != "loss" and label not in metrics:
            metrics[label] = by_step[max(by_step)]
    return {
        "steps": max((r["step"] for r in steps), default=meta.get("step")),
        # time spent in logged steps, resumed attempts included (that time was paid for); evals and saves excluded
        "wall_s": sum(r["dt"] for r in steps if isinstance(r.get("dt"), (int, float))),
        "gpus": meta.get("world_size", 1),
        "tokens": meta.get("tokens"),
        "params": params,
        "metrics": metrics,
        "series": {k: sorted(v.items()) for k, v in series.items()},
        "core": evals.get("core"),
    }


def _chat_rows(res: dict) -> dict:
    """ChatCORE results ({task: accuracy, ..., "chatcore": mean centered accuracy}) as table rows."""
    return {"ChatCORE" if k == "chatcore" else f"ChatCORE {k}": v for k, v in res.items()
            if isinstance(v, (int, float)) and k not in EVAL_KEYS}


def find_runs(run_root: Path) -> dict:
    """{stage: [run folders]} for the model stages; a run folder holds metrics, a checkpoint or eval.json."""
    runs = {}
    for stage in MODEL_STAGES:
        folder = run_root / stage
        found = [d for d in sorted(folder.iterdir()) if d.is_dir() and any(
            (d / f).exists() for f in ("metrics.jsonl", "latest", "eval.json"))] if folder.is_dir() else []
        runs[stage] = found
    return runs


def plot_run(name: str, series: dict, path: Path) -> bool:
    """Training loss and each logged metric against step, one panel each. False when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ["loss", *sorted(k for k in series if k != "loss")] if len(series.get(k, ())) >= 2]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, lw=1.2)
        ax.set_title(f"{name}: {k}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _num(x, fmt="{:,}"):
    return "—" if x is None else fmt.format(x)


def _duration(seconds) -> str:
    if not seconds:
        return "—"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def speedrun_section(run_root: Path) -> list:
    """Per `fastchat speedrun` preset, each stage's whole process time (start-up, data preparation and
    evaluation included), from the stage markers; [] when no speedrun ran here."""
    md = []
    for folder in sorted(p for p in (run_root / "speedrun").glob("*") if p.is_dir()):
        marks = sorted(((json.loads(f.read_text()), f.stem) for f in folder.glob("*.done")),
                       key=lambda m: m[0].get("finished", 0))
        if marks:
            md += ["", "Speedrun, process wall time per stage (start-up and evaluation included):", "",
                   "| preset | " + " | ".join(name for _, name in marks) + " | total |",
                   "|" + " --- |" * (len(marks) + 2),
                   f"| {folder.name} | " + " | ".join(_duration(m.get("seconds")) for m, _ in marks)
                   + f" | {_duration(sum(m.get('seconds', 0) for m, _ in marks))} |"]
    return md


def build_report(run_root, out, gpu_hour_cost: float = 3.0) -> str:
    """Write the report card to `out` (plots into a plots/ folder beside it); returns the markdown."""
    run_root, out = Path(run_root), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = find_runs(run_root)
    summaries = {f"{stage}/{d.name}": summarize_run(d) for stage in MODEL_STAGES for d in runs[stage]}
    md = ["# fastchat report card", "",
          f"Run root: `{run_root}`. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
          "## Environment (where this report was written)", "", "| | |", "| --- | --- |"]
    md += [f"| {k} | {v} |" for k, v in environment().items()]

    md += ["", "## Stages", "",
           f"Wall time is the sum of the step times in metrics.jsonl (evaluation and checkpointing excluded); "
           f"cost = wall time x GPUs x ${gpu_hour_cost:.2f} per GPU-hour.", "",
           "| stage | run | steps | tokens | parameters | GPUs | wall time | cost |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    tok_path = run_root / "tokenizer" / "tokenizer.json"
    if tok_path.exists():
        from fastchat_core.tokenizer import get_tokenizer
        vocab = get_tokenizer(tok_path).vocab_size
        md.append(f"| tokenizer | tokenizer.json | — | — | vocab {vocab:,} | — | — | — |")
    else:
        md.append("| tokenizer | not run | | | | | | |")
    total_s = total_cost = 0.0
    for stage in MODEL_STAGES:
        if not runs[stage]:
            md.append(f"| {stage} | not run | | | | | | |")
            continue
        for d in runs[stage]:
            s = summaries[f"{stage}/{d.name}"]
            cost = s["wall_s"] / 3600 * s["gpus"] * gpu_hour_cost
            total_s += s["wall_s"]
            total_cost += cost
            md.append(f"| {stage} | {d.name} | {_num(s['steps'])} | {_num(s['tokens'])} | {_num(s['params'])} | "
                      f"{s['gpus']} | {_duration(s['wall_s'])} | ${cost:,.2f} |")
    md.append(f"| **total** | | | | | | {_duration(total_s)} | ${total_cost:,.2f} |")
    md += speedrun_section(run_root)

    md += ["", "## Metrics", ""]
    rows = list(dict.fromkeys(k for s in summaries.values() for k in s["metrics"]))
    if rows:
        names = list(summaries)
        md += ["| metric | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for row in rows:
            md.append(f"| {row} | " + " | ".join(_cell(summaries[n]["metrics"].get(row, "—")) for n in names) + " |")
    else:
        md.append("No metrics yet: train a stage, then `fastchat train eval --checkpoint DIR`.")

    for name, s in summaries.items():
        if s["core"]:
            md += ["", f"### CORE tasks ({name}, step {s['core'].get('step')})", "",
                   "| task | accuracy | centered |", "| --- | --- | --- |"]
            md += [f"| {label} | {r['accuracy']:.4f} | {r['centered']:.4f} |"
                   for label, r in s["core"]["tasks"].items()]
            md += [f"| **CORE** | | **{s['core']['core']:.4f}** |", "", f"Note: {s['core'].get('note', '')}"]

    md += ["", "## Curves", ""]
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
        md.append("Plots skipped: matplotlib is not installed (`pip install matplotlib`).")
    if have_mpl:
        plotted = 0
        for name, s in summaries.items():
            rel = Path("plots") / f"{name.replace('/', '_')}.png"
            if plot_run(name, s["series"], out.parent / rel):
                md += [f"![{name}]({rel.as_posix()})", ""]
                plotted += 1
        if not plotted:
            md.append("No run has logged two or more steps yet.")
    text = "\n".join(md) + "\n"
    out.write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastchat report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", default=None, help="default $FASTCHAT_HOME")
    p.add_argument("--out", default=None, help="markdown file to write (default <run-root>/report/report.md)")
    p.add_argument("--gpu-hour-cost", type=float, default=3.0, help="USD per GPU-hour, for the cost column")
    args = p.parse_args(argv)
    run_root = Path(args.run_root) if args.run_root else home_dir()
    if not run_root.is_dir():
        raise SystemExit(f"--run-root {run_root} is not a folder: point it at your $FASTCHAT_HOME")
    out = Path(args.out) if args.out else run_root / "report" / "report.md"
    build_report(run_root, out, args.gpu_hour_cost)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

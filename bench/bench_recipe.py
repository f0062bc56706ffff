"""Recipes at equal wall-clock on one GPU: which trains the better model in the same time?

    python -m fastchat_core.bench.bench_recipe --data DIR --tokenizer tokenizer.json --budget 90 \
        --out bench/results/recipe_ab.json

Each recipe is `fastchat train base` at --depth (d12 by default) on the same text, tokenizer and data order
(same seed), given the same --budget seconds of training steps (--time-budget: the step count is fixed from
the measured step time once compilation is over, so the LR schedule still ends at the end of the budget), then
evaluated with the same evaluator: val bits per byte on the held-out shard, --eval-tokens of it. Recipes:
  today      our defaults
  nanochat   nanochat's current model (value embeddings, per-layer scalars, smear, backout, windows...)
  nanochat+  the same model with nanochat's current optimizer and schedules
Reported per recipe: val bpb over wall-clock (every --eval-every steps, and at the end), steps, tokens/s,
MFU, peak GPU memory; a plot of val bpb against training seconds beside the JSON.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {"today": [], "nanochat": ["--recipe=nanochat"], "nanochat+": ["--recipe=nanochat", "--optim-recipe=nanochat"]}


def train(flags, args):
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "fastchat_core.train.base", f"--data={args.data}", f"--tokenizer={args.tokenizer}",
               f"--depth={args.depth}", f"--seq-len={args.seq_len}", f"--device-batch-size={args.device_batch_size}",
               f"--total-batch-size={args.total_batch_size}", f"--time-budget={args.budget}",
               f"--eval-every={args.eval_every}", f"--eval-tokens={args.eval_tokens}", "--save-every=-1",
               f"--seed={args.seed}", f"--run-dir={run_dir}", "--log-every=20", *flags]
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(out.stdout[-1500:])
        if out.returncode:
            return {"error": out.stderr[-3000:]}
        recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    summary = next(r["summary"] for r in recs if "summary" in r)
    curve = [{"step": r["step"], "train_seconds": r.get("train_seconds"), "val_bpb": r["val_bpb"]}
             for r in recs if "val_bpb" in r]
    return {"flags": flags, "summary": summary, "val_bpb_curve": curve, "final_val_bpb": curve[-1]["val_bpb"],
            "wall_s": time.time() - t0}


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        if "val_bpb_curve" in r:
            pts = [(p["train_seconds"], p["val_bpb"]) for p in r["val_bpb_curve"] if p["train_seconds"] is not None]
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel="training seconds", ylabel="val bits per byte", title="recipes at equal wall-clock")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=131072)
    p.add_argument("--budget", type=float, default=90, help="seconds of training steps per recipe")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import triton
    from fastchat_core.common import git_commit
    results = {}
    for name in args.recipes.split(","):
        results[name] = train(RECIPES[name], args)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'val_bpb_curve'})[:600]}",
              flush=True)
    doc = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(), "setup": {k: v for k, v in vars(args).items() if k != "out"},
           "recipes": results}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"\n{'recipe':10s} {'val bpb':>8s} {'steps':>6s} {'tok/s':>10s} {'MFU':>6s}")
    for name, r in results.items():
        s = r.get("summary", {})
        print(f"{name:10s} {r.get('final_val_bpb', float('nan')):8.4f} {s.get('steps', 0):6d} "
              f"{s.get('tokens_per_s') or 0:10,.0f} {100 * (s.get('mfu') or 0):5.1f}%")


if __name__ == "__main__":
    main()

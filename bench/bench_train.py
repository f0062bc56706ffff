"""End-to-end pretraining throughput on one GPU: tokens/s and MFU at d12 and d20, kernels on and off.

Random tokens, vocab 65,536, T=2048, full MHA, torch.compile, Muon+AdamW step included: the set-up of
PERF.md's nanochat anchor, so the numbers compare directly. Each configuration runs in its own process
(clean memory and compile caches); the first steps (compilation) are excluded from the timing.

    python -m fastchat_core.bench.bench_train --out bench/results/train_d20.json [--kernels both]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastchat_core.common import git_commit

ANCHOR = {12: {"tokens_per_s": 418_000, "mfu": 0.439}, 20: {"tokens_per_s": 122_700, "mfu": 0.433}}
BATCH = {12: 32, 20: 16}


def run_one(depth, kernels, steps, profile=None, data=None, eval_every=100):
    """One training run in its own process; `data` = (folder, tokenizer) for real text, else random tokens."""
    B = BATCH[depth]
    run_dir = Path(f"/tmp/bench_train/d{depth}_k{int(kernels)}_{'text' if data else 'random'}")
    source = [f"--data={data[0]}", f"--tokenizer={data[1]}", f"--eval-every={eval_every}", "--eval-tokens=524288"] \
        if data else ["--random-data", "--eval-every=0"]
    cmd = [sys.executable, "-m", "fastchat_core.train.base", *source, f"--depth={depth}",
           f"--device-batch-size={B}", f"--total-batch-size={B * 2048}", f"--num-iterations={steps}",
           "--log-every=10", "--kernels" if kernels else "--no-kernels", f"--run-dir={run_dir}",
           "--save-every=-1"]   # a d20 checkpoint is GBs of disk writes the benchmark does not need
    if profile:
        cmd.append(f"--profile={profile}")
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(out.stdout[-3000:])
    if out.returncode:
        sys.stdout.write(out.stderr[-6000:])
        return {"depth": depth, "kernels": kernels, "error": out.stderr[-2000:]}
    summary = json.loads(out.stdout.split("summary: ", 1)[1].splitlines()[0])
    summary.update(depth=depth, kernels=kernels, batch=f"{B}x2048", wall_s=time.time() - t0,
                   data="text" if data else "random")
    if data:
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary["loss_curve"] = [r["loss"] for r in recs if "loss" in r]
        summary["val_bpb"] = {r["step"]: r["val_bpb"] for r in recs if "val_bpb" in r}
    return summary


def plot_curves(runs, path):
    """Kernels off vs on, training loss per step and val bpb: the two curves should lie on each other."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        label = f"kernels {'on' if r['kernels'] else 'off'}"
        ax1.plot(r["loss_curve"], label=label, lw=1)
        if r["val_bpb"]:
            ax2.plot([int(s) for s in r["val_bpb"]], list(r["val_bpb"].values()), marker="o", label=label)
    ax1.set(xlabel="step", ylabel="train loss", title=f"d{runs[0]['depth']} on real text")
    ax1.legend()
    if runs[0]["val_bpb"]:
        ax2.set(xlabel="step", ylabel="val bits per byte")
        ax2.legend()
    else:   # no evals: the per-step difference of the two curves instead
        off, on = runs[0]["loss_curve"], runs[1]["loss_curve"]
        ax2.plot([b - a for a, b in zip(off, on)], lw=1, color="k")
        ax2.set(xlabel="step", ylabel="train loss, kernels on - off")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--depths", default="20,12", help="random-token throughput runs ('' for none)")
    p.add_argument("--kernels", choices=["on", "off", "both"], default="both")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="bench/results/train_d20.json")
    p.add_argument("--profile-dir", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--curve", default=None, metavar="DATA,TOKENIZER",
                   help="also train d20 on real text for --curve-steps with the --kernels modes: same loss curve?")
    p.add_argument("--curve-steps", type=int, default=200)
    p.add_argument("--curve-eval-every", type=int, default=100,
                   help="val bpb every N steps of the curve runs (0: none, e.g. so both runs fit one device call)")
    args = p.parse_args(argv)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.kernels]
    results = []
    for depth in map(int, args.depths.split(",")) if args.depths else []:
        for k in modes:
            prof = str(Path(args.profile_dir) / f"profile_d{depth}_k{int(k)}.txt") if depth == 20 else None
            results.append(run_one(depth, k, args.steps, prof))
    if args.curve:
        runs = [run_one(20, k, args.curve_steps, data=args.curve.split(","), eval_every=args.curve_eval_every)
                for k in modes]
        results += runs
        if len(runs) == 2 and all("loss_curve" in r for r in runs):
            a, b = runs[0]["loss_curve"], runs[1]["loss_curve"]
            tail = slice(len(a) - 50, len(a))
            diff = sum(abs(x - y) for x, y in zip(a[tail], b[tail])) / 50
            last = [list(r["val_bpb"].values())[-1] if r["val_bpb"] else None for r in runs]
            print(f"real text, last 50 steps: mean loss off {sum(a[tail]) / 50:.4f} on {sum(b[tail]) / 50:.4f}, "
                  f"mean |diff| {diff:.4f}; final val bpb off {last[0]} on {last[1]}")
            plot_curves(runs, Path(args.out).with_suffix(".png"))
    import triton
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(),
           "setup": "random tokens, vocab 65536, T=2048, MHA, bf16 autocast, torch.compile, optimizer step included",
           "anchor_nanochat": ANCHOR, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"\n{'depth':>5} {'data':>6} {'kernels':>7} {'tok/s':>10} {'MFU':>6} {'vs nanochat':>11} {'peak GB':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['depth']:>5} {str(r['kernels']):>7}  ERROR")
            continue
        ratio = r["tokens_per_s"] / ANCHOR[r["depth"]]["tokens_per_s"]
        print(f"{r['depth']:>5} {r['data']:>6} {str(r['kernels']):>7} {r['tokens_per_s']:>10,.0f} {100 * r.get('mfu', 0):>5.1f}% "
              f"{ratio:>10.2f}x {r.get('peak_mem_gb', 0):>8.1f}")


if __name__ == "__main__":
    main()

"""Two source trees side by side on one GPU, serving and training: a refactor must not slow anything down
or change a single generated token.

    bash bench/compare_trees.sh OLD_COMMIT     # builds both trees on the device and runs this; see there
    python -m fastchat_core.bench.compare_trees --old ROOT --new ROOT --out refactor_check.json

Each ROOT is an import root holding fastchat_core/ laid out as setup.py installs it (triton_kernels/, train/,
serve/, bench/ inside it) with the compiled _C. Every measurement runs in a process of its own with
PYTHONPATH=ROOT, so each tree runs its own code end to end:
- serving: that tree's bench_serving d20 model and workload (random bf16 weights, --requests requests with
  100..1024 input and output tokens, greedy), through its run_engine; output tokens/s of each pass and the
  SHA-256 of every output token id (equal hashes: identical tokens);
- training: that tree's base driver, d20, random tokens, 16 x 2048 per step, kernels on, --steps steps:
  the median tokens/s of the steps after the first 5 (compilation).
The trees alternate (old, new, old, new) so that drift of the machine hits both alike.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SERVE = r"""
import hashlib, json, sys
from fastchat_core.bench import bench_serving as b
requests, repeats = int(sys.argv[1]), int(sys.argv[2])
model, cfg = b.build_model(20, 0)
reqs = b.workload(requests, 100, 1024, cfg.vocab_size)
passes, digest = [], None
for _ in range(repeats):
    stats, results = b.run_engine(model, reqs)
    passes.append(stats["output_tok_per_s"])
    digest = hashlib.sha256(json.dumps([list(r.token_ids) for r in results]).encode()).hexdigest()
print("RESULT " + json.dumps({"output_tok_per_s": passes, "tokens_sha256": digest,
                              "output_tokens": stats["output_tokens"]}))
"""


def run(root, args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1", **(env_extra or {}))
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{args[:3]} failed in {root}:\n{out.stderr[-3000:]}")
    return out.stdout


def serve(root, requests, repeats):
    line = next(l for l in run(root, ["-c", SERVE, str(requests), str(repeats)]).splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def train(root, steps):
    with tempfile.TemporaryDirectory() as run_dir:
        run(root, ["-m", "fastchat_core.train.base", "--random-data", "--depth=20", "--device-batch-size=16",
                   f"--total-batch-size={16 * 2048}", f"--num-iterations={steps}", "--log-every=10", "--kernels",
                   f"--run-dir={run_dir}", "--save-every=-1", "--eval-every=0"])
        recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in recs if "tok_per_s" in r and r.get("step", 0) > 5]
    return {"median_tok_per_s": statistics.median(rates), "steps_timed": len(rates)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--old-commit", default="?")
    p.add_argument("--new-commit", default="?")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch
    import triton
    trees = {"old": args.old, "new": args.new}
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "commits": {"old": args.old_commit, "new": args.new_commit},
           "serving": {"workload": {"depth": 20, "requests": args.requests, "in_out_uniform": [100, 1024],
                                    "greedy": True, "seed": 0}},
           "training": {"depth": 20, "batch": "16x2048", "random_tokens": True, "kernels": True, "steps": args.steps}}
    for name in ("old", "new", "old", "new"):
        doc["serving"].setdefault(name, []).append(serve(trees[name], args.requests, args.repeats))
        print(f"serving {name}: {doc['serving'][name][-1]}", flush=True)
    for name in ("old", "new"):
        doc["training"][name] = train(trees[name], args.steps)
        print(f"training {name}: {doc['training'][name]}", flush=True)
    best = {n: max(t for r in doc["serving"][n] for t in r["output_tok_per_s"]) for n in trees}
    digests = {r["tokens_sha256"] for n in trees for r in doc["serving"][n]}
    doc["summary"] = {
        "serving_best_tok_per_s": best, "serving_new_over_old": best["new"] / best["old"],
        "tokens_identical": len(digests) == 1,
        "training_new_over_old": doc["training"]["new"]["median_tok_per_s"] / doc["training"]["old"]["median_tok_per_s"]}
    Path(args.out).write_text(json.dumps(doc, indent=1))
    s = doc["summary"]
    print(f"\n{'':10s} {'old':>12s} {'new':>12s} {'new/old':>8s}")
    print(f"{'serving':10s} {best['old']:12,.0f} {best['new']:12,.0f} {s['serving_new_over_old']:8.3f}  tok/s (best pass)")
    print(f"{'training':10s} {doc['training']['old']['median_tok_per_s']:12,.0f} "
          f"{doc['training']['new']['median_tok_per_s']:12,.0f} {s['training_new_over_old']:8.3f}  tok/s (median step)")
    print(f"identical tokens: {s['tokens_identical']}")


if __name__ == "__main__":
    main()

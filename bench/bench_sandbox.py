"""What the python tool's isolation costs per call (CPU only: no GPU involved).

    python -m fastchat_core.bench.bench_sandbox --out bench/results/sandbox.json

Rows, each timed --calls times after --warmup calls, one call at a time (medians and p90, wall clock):
- calculator: the in-process fast path for pure arithmetic (what most GSM8K tool calls take).
- bare_interpreter: `python -I -S -c CODE` started the way run_python starts its child, with no isolation:
  the floor of any one-process-per-call design.
- run_python: the sandboxed call, same code (namespaces, pivot_root, seccomp, rlimits, supervisor + worker).
- check_program_split: a HumanEval-style check with the tests in the supervisor and the solution in the worker.
isolation_ms = run_python - bare_interpreter: what the sandbox adds on top of starting Python at all.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from fastchat_core import tools
from fastchat_core.common import git_commit

CODE = "12*7+3"
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def timed(fn, calls, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "min_ms": times[0], "calls": calls}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()

    assert tools.calculator(CODE) == "87" and tools.run_python(CODE) == (True, "87")
    assert tools.check_program(SOLUTION, tests=TESTS, entry_point="add") == (True, "")
    bare = [sys.executable, "-I", "-S", "-c", f"print({CODE})"]
    rows = {
        "calculator": timed(lambda: tools.calculator(CODE), args.calls, args.warmup),
        "bare_interpreter": timed(lambda: subprocess.run(bare, capture_output=True, env={}, cwd="/", check=True),
                                  args.calls, args.warmup),
        "run_python": timed(lambda: tools.run_python(CODE), args.calls, args.warmup),
        "check_program_split": timed(lambda: tools.check_program(SOLUTION, tests=TESTS, entry_point="add"),
                                     args.calls, args.warmup),
    }
    isolation = rows["run_python"]["median_ms"] - rows["bare_interpreter"]["median_ms"]
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "kernel": platform.release(), "python": platform.python_version()},
              "commit": git_commit(), "code": CODE, "rows": rows, "isolation_ms": isolation}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{'row':22s} {'median ms':>10s} {'p90 ms':>8s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['median_ms']:10.3f} {r['p90_ms']:8.3f}")
    print(f"isolation on top of a bare interpreter: {isolation:.1f} ms per call")


if __name__ == "__main__":
    main()

"""The whole pipeline in one command: `fastchat speedrun --preset tiny|d12-1gpu|d12|d20|d26`.

tokenizer -> base -> mid -> sft -> rl -> eval -> report -> one chat reply. Each stage runs as its own
process (under torchrun when --nproc > 1) and leaves a marker in $FASTCHAT_HOME/speedrun/<preset>/ when it
succeeds, so running the command again resumes at the first unfinished stage (--restart to start over).
Without $FASTCHAT_DATA the tiny preset still runs offline: it says so, pretrains on the text of this Python
installation's own sources, and fine-tunes on generated tasks.
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastchat_core.common import data_root, home_dir


@dataclass
class Preset:
    depth: int
    vocab: int
    seq_len: int
    batch: int            # rows per rank per micro-step
    total_batch: int      # tokens per optimizer step
    base_steps: int       # -1: Chinchilla-style 20 tokens per parameter
    tok_chars: float
    nproc: int
    mid: list = field(default_factory=list)
    sft: list = field(default_factory=list)
    rl: list = field(default_factory=list)
    eval_base: list = field(default_factory=list)
    eval_chat: list = field(default_factory=list)
    threads: int = 0


PRESETS = {
    # minutes on a 2-core CPU: a model that learns something, and every stage exercised
    "tiny": Preset(depth=2, vocab=4096, seq_len=256, batch=16, total_batch=4096, base_steps=200, tok_chars=2e7,
                   nproc=1, threads=2,
                   mid=["--num-iterations=60", "--device-batch-size=8", "--rows-per-step=16", "--limit=2000"],
                   sft=["--num-iterations=60", "--device-batch-size=8", "--rows-per-step=16", "--limit=2000"],
                   rl=["--num-steps=3", "--group-size=4", "--questions-per-step=4", "--max-new-tokens=48",
                       "--eval-every=0", "--device-batch-size=8"],
                   eval_base=["--core", "--bpb", "--max-per-task=16", "--bpb-tokens=65536"],
                   eval_chat=["--chat", "--max-per-task=16"]),
    # one GPU, every stage shortened to fit one 8-minute device call on one H100/H200 (nothing survives
    # between calls there): base 200 steps x 131k tokens = 26M tokens; CORE on 100 items per task, ChatCORE on 50
    "d12-1gpu": Preset(depth=12, vocab=65536, seq_len=2048, batch=32, total_batch=131072, base_steps=200,
                       tok_chars=2e8, nproc=1,
                       mid=["--num-iterations=60", "--device-batch-size=16", "--rows-per-step=64"],
                       sft=["--num-iterations=40", "--device-batch-size=16", "--rows-per-step=64"],
                       rl=["--num-steps=6", "--group-size=8", "--questions-per-step=16", "--max-new-tokens=256",
                           "--eval-every=0", "--device-batch-size=32"],
                       eval_base=["--core", "--bpb", "--max-per-task=100", "--bpb-tokens=1048576"],
                       eval_chat=["--chat", "--max-per-task=50"]),
    # 8 GPUs (nanochat's speedrun scale); d12 is the quick one
    "d12": Preset(depth=12, vocab=65536, seq_len=2048, batch=32, total_batch=524288, base_steps=-1, tok_chars=2e9,
                  nproc=8, eval_base=["--core", "--bpb"], eval_chat=["--chat"]),
    "d20": Preset(depth=20, vocab=65536, seq_len=2048, batch=32, total_batch=524288, base_steps=-1, tok_chars=2e9,
                  nproc=8, eval_base=["--core", "--bpb"], eval_chat=["--chat"]),
    "d26": Preset(depth=26, vocab=65536, seq_len=2048, batch=16, total_batch=524288, base_steps=-1, tok_chars=2e9,
                  nproc=8, eval_base=["--core", "--bpb"], eval_chat=["--chat"]),
}


def fallback_corpus(dest: Path) -> Path:
    """Offline pretraining text: this Python installation's own library sources, one document per file."""
    marker = dest / ".complete"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in src.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    for i, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 200:
            (dest / f"doc_{i:05d}.txt").write_text(text, encoding="utf-8")
    marker.touch()
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastchat speedrun", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--nproc", type=int, default=None, help="processes (GPUs) per stage (default: the preset's)")
    p.add_argument("--restart", action="store_true", help="ignore stage markers and run every stage again")
    p.add_argument("--prompt", default="Why is the sky blue?", help="the question for the final chat reply")
    args = p.parse_args(argv)
    pre = PRESETS[args.preset]
    nproc = args.nproc or pre.nproc
    home = home_dir()
    state = home / "speedrun" / args.preset
    state.mkdir(parents=True, exist_ok=True)
    tokenizer = home / "tokenizer" / "tokenizer.json"

    root = data_root()
    if root is not None and (root / "pretrain").exists():
        pretrain = root / "pretrain"
        print(f"speedrun {args.preset}: real data from FASTCHAT_DATA={root}")
    else:
        if args.preset != "tiny":
            raise SystemExit("FASTCHAT_DATA is not set (or has no pretrain/): the large presets need real data; "
                             "export FASTCHAT_DATA=/path/to/data")
        pretrain = fallback_corpus(home / "fallback_corpus")
        why = "is not set" if root is None else f"({root}) has no pretrain/ folder"
        root = None  # without the pretraining text, treat the data sets as absent too
        print(f"speedrun tiny: FASTCHAT_DATA {why}, so pretraining on this Python's own sources ({pretrain}) "
              "and fine-tuning on generated tasks (spelling, arithmetic tool use, identity); RL and the "
              "data-backed evaluations are skipped")

    common = [f"--threads={pre.threads}"] if pre.threads else []
    base_args = [f"--depth={pre.depth}", f"--seq-len={pre.seq_len}", f"--device-batch-size={pre.batch}",
                 f"--total-batch-size={pre.total_batch}", f"--data={pretrain}", f"--tokenizer={tokenizer}",
                 "--log-every=25"]
    base_args += ["--eval-every=100", "--eval-tokens=65536"] if args.preset == "tiny" else ["--eval-every=200"]
    if pre.base_steps > 0:
        base_args.append(f"--num-iterations={pre.base_steps}")
    run = lambda stage: str(home / stage / f"d{pre.depth}")  # noqa: E731
    stages = [
        ("tokenizer", "fastchat_core.train.tokenizer",
         ["train", f"--data={pretrain}", f"--vocab-size={pre.vocab}", f"--max-chars={pre.tok_chars:.0f}",
          f"--out={tokenizer}"], False),
        ("base", "fastchat_core.train.base", base_args + common, True),
        ("mid", "fastchat_core.train.mid", [f"--init-from={run('base')}"] + pre.mid + common, True),
        ("sft", "fastchat_core.train.sft", [f"--init-from={run('mid')}"] + pre.sft + common, True),
        ("rl", "fastchat_core.train.rl", [f"--init-from={run('sft')}"] + pre.rl + common, True),
        ("eval_base", "fastchat_core.train.eval", [f"--checkpoint={run('base')}"] + pre.eval_base + common, True),
        ("eval_chat", "fastchat_core.train.eval",
         [f"--checkpoint={run('rl') if root else run('sft')}"] + pre.eval_chat + common, True),
        ("report", "fastchat_core.report", [], False),
        ("chat", "fastchat_core.chat_cli", [f"--checkpoint={run('rl') if root else run('sft')}", "-p", args.prompt,
                                            "--seed=0"], False),
    ]
    if root is None:  # nothing to score or reward without the data sets
        stages = [s for s in stages if s[0] not in ("rl", "eval_chat")]
        stages[[s[0] for s in stages].index("eval_base")] = (
            "eval_base", "fastchat_core.train.eval", [f"--checkpoint={run('base')}", "--bpb",
                                                      "--bpb-tokens=65536", f"--data={pretrain}"] + common, True)

    timings = {}
    t_start = time.time()
    for name, module, stage_args, distributed in stages:
        done = state / f"{name}.done"
        if done.exists() and not args.restart and name != "chat":
            print(f"[speedrun] {name}: done earlier, skipping ({done})")
            continue
        if distributed and nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", module, *stage_args]
        else:
            cmd = [sys.executable, "-m", module, *stage_args]
        print(f"\n[speedrun] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if root is None:  # the stages must agree with the fallback decision made here
            env.pop("FASTCHAT_DATA", None)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise SystemExit(f"[speedrun] stage {name} failed (exit {rc}); fix it and run the same command again "
                             "to resume from this stage")
        timings[name] = time.time() - t0
        done.write_text(json.dumps({"seconds": timings[name], "finished": time.time()}))
    print(f"\n[speedrun] finished in {(time.time() - t_start) / 60:.1f} min: "
          + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"[speedrun] report: {home / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `fastchat` command: one entry point whose subcommands run the drivers in train/, serve/ and bench/.

Each subcommand hands the rest of the command line to its module's main(argv), so
`fastchat train base --depth 12` == `python -m fastchat_core.train.base --depth 12`.
"""
import importlib
import sys

# subcommand -> (module, help); "train" and "bench" are groups with subcommands of their own.
COMMANDS = {
    "tokenizer": ("fastchat_core.train.tokenizer", "train or evaluate the BPE tokenizer"),
    "chat": ("fastchat_core.chat_cli", "chat with a model in the terminal (-p for one question)"),
    "serve": ("fastchat_core.serve", "OpenAI-compatible server + web UI (--port, --api-key, ...)"),
    "report": ("fastchat_core.report", "write the markdown report card of a whole run"),
    "speedrun": ("fastchat_core.train.speedrun", "every stage, tokenizer to chat (--preset tiny|d12-1gpu|d12|d20|d26)"),
}
TRAIN_STAGES = {
    "base": ("fastchat_core.train.base", "pretrain a base model (torchrun for several GPUs)"),
    "mid": ("fastchat_core.train.mid", "midtrain a base model on chat, tool use and multiple choice"),
    "sft": ("fastchat_core.train.sft", "supervised fine-tuning on a curated chat mixture"),
    "eval": ("fastchat_core.train.eval", "evaluate a checkpoint: CORE, bits per byte, ChatCORE"),
    "rl": ("fastchat_core.train.rl", "reinforcement learning on GSM8K with GRPO, from the SFT model"),
}
BENCHES = {  # GPU benchmarks; the kernel microbenchmarks are pytest-benchmark: pytest bench/bench_kernels.py
    "train": ("fastchat_core.bench.bench_train", "pretraining tokens/s and MFU, kernels on/off"),
    "decode": ("fastchat_core.bench.bench_decode_attention", "paged decode attention vs SDPA and FlexAttention"),
    "serving": ("fastchat_core.bench.bench_serving", "offline engine throughput vs HF generate and a serial loop"),
    "server": ("fastchat_core.bench.bench_server", "HTTP server under Poisson load: throughput, TTFT, ITL"),
}
GROUPS = {"train": TRAIN_STAGES, "bench": BENCHES}


def _usage() -> str:
    lines = ["usage: fastchat <command> [args...]", "", "commands:"]
    for name, (_, help_) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_}")
    for group, subs in GROUPS.items():
        lines.append(f"  {group:<12} {', '.join(subs)}")
        for name, (_, help_) in subs.items():
            lines.append(f"    {name:<10} {help_}")
    lines += ["", "`fastchat <command> --help` for a command's options."]
    return "\n".join(lines)


def run(main, argv, prog: str) -> int:
    """main(argv) as a command: a UserError (a flag, a path, a damaged file: the user's to fix) is printed as
    `prog: error: message`, without a traceback, and gives exit status 1. Every `fastchat` command and every
    `python -m fastchat_core.train.X` runs through here."""
    from fastchat_core.common import UserError  # here, not at the top: `fastchat --help` does not load torch
    try:
        result = main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in GROUPS:
        subs = GROUPS[cmd]
        if not rest or rest[0] not in subs:
            print(f"fastchat {cmd}: choose one of: {', '.join(subs)}", file=sys.stderr)
            return 2
        module, rest = subs[rest[0]][0], rest[1:]
    elif cmd in COMMANDS:
        module = COMMANDS[cmd][0]
    else:
        print(f"fastchat: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    prog = "fastchat " + " ".join(argv[:2] if cmd in GROUPS else argv[:1])
    return run(importlib.import_module(module).main, rest, prog)


if __name__ == "__main__":
    sys.exit(main())

"""Midtraining: `fastchat train mid` or `torchrun --nproc_per_node=N -m fastchat_core.train.mid`.

The step between pretraining and SFT: the base model learns the chat format and its special tokens, tool
calls (GSM8K's calculator steps, arithmetic, spelling checks) and letter-answer multiple choice, from all
the chat data at full learning rate. Without $FASTCHAT_DATA only the generated tasks are used.

It is sft.py's stage with two differences: conversations are *packed* into full rows of seq_len tokens
(whole conversations, each after its own <|bos|>, as pretraining packs documents), and the mixture is
broader. The loss is still on the assistant's tokens only. Saves to $FASTCHAT_HOME/mid/d<depth>.
"""
import sys

from fastchat_core.cli import run as run_command
from fastchat_core.common import data_root, print0
from fastchat_core.tasks.base import TaskMixture
from fastchat_core.train import sft


def mid_tasks(args):
    """(train, val) mixtures: every chat source, GSM8K train, MMLU dev (+ auxiliary_train when present)
    and the generated tasks; the generated tasks alone without data."""
    if data_root() is None:
        print0("FASTCHAT_DATA is not set: training on generated tasks only (identity, spelling, arithmetic)")
        train = TaskMixture(sft.generated_tasks(args.seed, scale=2), epochs=args.epochs, seed=args.seed)
        return train, TaskMixture(sft.generated_tasks(args.seed + 1), seed=args.seed + 1)
    from fastchat_core.tasks.conversations import SOURCES, Conversations
    from fastchat_core.tasks.gsm8k import GSM8K
    from fastchat_core.tasks.mmlu import MMLU
    mmlu = [MMLU("dev")]
    if (data_root() / "mmlu" / "auxiliary_train.jsonl.gz").exists():
        mmlu.append(MMLU("auxiliary_train"))
    tasks = [Conversations(s) for s in SOURCES] + [GSM8K("train")] + mmlu + sft.generated_tasks(args.seed, 2)
    train = TaskMixture(tasks, epochs=args.epochs, seed=args.seed)
    val = TaskMixture([Conversations(s, "val") for s in SOURCES] + sft.generated_tasks(args.seed + 1),
                      seed=args.seed + 1)
    return train, val


def main(argv=None):
    # nanochat's midtraining batch: 256 rows of 2048 tokens (0.5M tokens), full LRs, the last 20% decayed
    args = sft.get_args(argv, "mid", __doc__, device_batch_size=32, rows_per_step=256, init_lr_frac=1.0,
                        warmdown_ratio=0.2)
    return sft.train(args, mid_tasks, stage="mid", pack=True, init_stages=("base",))


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat train mid"))

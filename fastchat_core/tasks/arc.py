"""ARC-Easy / ARC-Challenge (grade-school science, 3-5 choices) as letter-answer conversations.

Only the test splits ship in $FASTCHAT_DATA/arc, so ARC is evaluation only here; a train split
(arc_<subset>_train.jsonl.gz in the same format) would load with split="train".
"""
from fastchat_core.tasks.base import Task, multiple_choice, read_jsonl


class ARC(Task):
    eval_type = "categorical"

    def __init__(self, subset: str = "easy", split: str = "test"):
        if subset not in ("easy", "challenge"):
            raise ValueError(f"ARC subset must be 'easy' or 'challenge', got {subset!r}")
        self.items = read_jsonl("arc", f"arc_{subset}_{split}.jsonl.gz")

    def __len__(self):
        return len(self.items)

    def get(self, i):
        r = self.items[i]
        labels = r["choices"]["label"]
        return multiple_choice(r["question"], r["choices"]["text"], labels.index(r["answerKey"]))

"""MMLU (57 subjects, 4 choices) as letter-answer conversations; categorical eval.

Splits are the files $FASTCHAT_DATA/mmlu/<split>.jsonl.gz: "dev" (285 five-shot exemplars: the only
MMLU data we train on), "test" (14,042: evaluation only) and "auxiliary_train" when a copy is present.
"""
from fastchat_core.tasks.base import Task, multiple_choice, read_jsonl


class MMLU(Task):
    eval_type = "categorical"

    def __init__(self, split: str = "test", subject: str | None = None):
        self.items = read_jsonl("mmlu", f"{split}.jsonl.gz")
        if subject is not None:
            subjects = sorted({r["subject"] for r in self.items})
            if subject not in subjects:
                raise ValueError(f"unknown MMLU subject {subject!r}; the subjects are {subjects}")
            self.items = [r for r in self.items if r["subject"] == subject]

    def __len__(self):
        return len(self.items)

    def get(self, i):
        r = self.items[i]
        conversation = multiple_choice(r["question"], r["choices"], r["answer"])
        conversation["subject"] = r["subject"]
        return conversation

"""General chat from $FASTCHAT_DATA/chat/<source>.jsonl.gz: training only (no grading).

Sources: sgd_dialogues (task-oriented dialogues), taskmaster4_coffee (coffee orders), self_instruct_human_written
(instruction -> response), gpteacher_codegen (code instructions). Splits: a record with a "split" field (SGD)
keeps it, "train" -> train and "dev" -> val (SGD's test dialogues are left out); the other sources have none,
so every VAL_EVERY-th record is val and the rest train.
"""
from fastchat_core.tasks.base import Task, read_jsonl

SOURCES = ("sgd_dialogues", "taskmaster4_coffee", "self_instruct_human_written", "gpteacher_codegen")
VAL_EVERY = 50


def _split_of(record: dict, index: int) -> str | None:
    if "split" in record:
        return {"train": "train", "dev": "val"}.get(record["split"])
    return "val" if index % VAL_EVERY == VAL_EVERY - 1 else "train"


class Conversations(Task):
    def __init__(self, source: str, split: str = "train"):
        if source not in SOURCES:
            raise ValueError(f"unknown chat source {source!r}; choose from {SOURCES}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.records = read_jsonl("chat", f"{source}.jsonl.gz")
        self.indices = [i for i, r in enumerate(self.records) if _split_of(r, i) == split]

    def __len__(self):
        return len(self.indices)

    def get(self, i):
        # role and content only: the records' other fields (ids, services) are not part of the chat
        messages = self.records[self.indices[i]]["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}

"""The Task interface, task mixtures, and helpers the concrete tasks share.

A task is a fixed, indexable list of conversations: dicts {"messages": [...]} in the tokenizer's chat format
(see Tokenizer.render_conversation), plus whatever the task needs to grade a reply. Tasks are used two ways:

- training: every task is a list of conversations to render with the loss mask;
- evaluation, by `eval_type`:
  "categorical"  multiple choice: the final assistant turn is one letter and the conversation lists the
                 allowed letters under "letters"; the model is scored by its logits over those letters right
                 after <|assistant_start|>, so there is no sampling and no answer parsing;
  "generative"   the model's sampled reply is graded by `task.check(conversation, reply)`;
  None           training only (general chat, generated data).
"""
import functools
import gzip
import json
import random
import string

from fastchat_core.common import require_data


class Task:
    """Subclasses implement __len__ and get(i); generative tasks also check(conversation, reply)."""

    eval_type: str | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> dict:
        raise NotImplementedError

    def check(self, conversation: dict, reply: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no generative evaluation")

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range (it has {n} conversations)")
        return self.get(i % n)

    def __iter__(self):
        return (self.get(i) for i in range(len(self)))


class ListTask(Task):
    """Ready-made conversations (a list of {"messages": ...} dicts), for custom data and tests."""

    def __init__(self, conversations):
        self.conversations = list(conversations)

    def __len__(self):
        return len(self.conversations)

    def get(self, i):
        return self.conversations[i]


class GeneratedTask(Task):
    """Conversations built by code, needing no data files: `size` of them, conversation i depending only on
    (seed, i), so use different seeds for training and validation. Subclasses name their random stream
    `kind`, set `default_size`, and implement make(rng) -> conversation."""

    kind: str
    default_size = 1000

    def __init__(self, size: int | None = None, seed: int = 0):
        self.size = self.default_size if size is None else size
        self.seed = seed

    def __len__(self):
        return self.size

    def get(self, i):
        # a string seed is hashed with SHA-512: stable across runs, and tasks of different kinds draw apart
        return self.make(random.Random(f"{self.kind}/{self.seed}/{i}"))

    def make(self, rng: random.Random) -> dict:
        raise NotImplementedError


class TaskMixture(Task):
    """Several tasks interleaved in one deterministic, shuffled order.

    weights[i] scales task i within each epoch: 2.0 shows every one of its conversations twice, 0.25 a
    seeded quarter of them (without repeats). Each of the `epochs` passes is shuffled on its own, so
    consecutive epochs do not repeat the order. The order depends only on the tasks' lengths, weights,
    epochs and seed: every rank of a distributed run builds the same mixture and takes its own share.
    """

    def __init__(self, tasks, weights=None, epochs: int = 1, seed: int = 0):
        tasks = list(tasks)
        weights = [1.0] * len(tasks) if weights is None else [float(w) for w in weights]
        if not tasks or len(weights) != len(tasks):
            raise ValueError(f"TaskMixture needs at least one task and one weight per task; got {len(tasks)} "
                             f"tasks and {len(weights)} weights")
        if any(w < 0 for w in weights) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"weights must be >= 0 and epochs an integer >= 1; got {weights}, {epochs!r}")
        self.tasks = tasks
        rng = random.Random(seed)
        self.order: list[tuple[int, int]] = []   # (task number, index in that task)
        for _ in range(epochs):
            epoch = []
            for t, (task, w) in enumerate(zip(tasks, weights)):
                repeats, frac = divmod(w, 1.0)
                epoch += [(t, i) for _ in range(int(repeats)) for i in range(len(task))]
                epoch += [(t, i) for i in rng.sample(range(len(task)), round(frac * len(task)))]
            rng.shuffle(epoch)
            self.order += epoch

    def __len__(self):
        return len(self.order)

    def get(self, i):
        t, j = self.order[i]
        return self.tasks[t][j]


def read_jsonl(*parts: str) -> list[dict]:
    """All records of a .jsonl.gz file under $FASTCHAT_DATA (a clear error when it is missing).

    Parsed once per process and shared (train and val splits of a source read the same file): treat the
    records as read-only."""
    return _read_jsonl(require_data(*parts))


@functools.lru_cache(maxsize=16)
def _read_jsonl(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def multiple_choice(question: str, choices: list[str], answer: int) -> dict:
    """A multiple-choice item as a conversation whose reply is one letter (A, B, ...); categorical eval.

    The reply is the bare letter, so it is the first token the assistant writes and the categorical eval
    reads the logits at that one position.
    """
    if not 2 <= len(choices) <= 26 or not 0 <= answer < len(choices):
        raise ValueError(f"a multiple-choice item needs 2-26 choices and an answer index among them; got "
                         f"{len(choices)} choices and answer {answer}")
    letters = list(string.ascii_uppercase[:len(choices)])
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    user = (f"Multiple choice question: {question}\n\n{lines}\n\n"
            f"Answer with the letter of the correct choice ({', '.join(letters)}) and nothing else.")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": letters[answer]}],
            "letters": letters}

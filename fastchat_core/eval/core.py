"""CORE: the DCLM in-context-learning suite that nanochat reports for base models.

Each task is scored by comparing the model's losses on a few candidate texts (facts from the DCLM paper and
nanochat's evaluation; the code is ours):
  multiple_choice    one prompt per choice; the choice whose tokens (after the prefix all choices share)
                     have the lowest mean loss is the answer
  schema             one prompt per context option, all ending in the same continuation; the option under
                     which that shared continuation has the lowest mean loss is the answer
  language_modeling  correct when greedy decoding would produce the continuation: the argmax at every one of
                     its tokens is that token
Items and few-shot examples are drawn exactly as nanochat draws them (scripts/base_eval.py evaluate_core and
nanochat/core_eval.py evaluate_example), so that one checkpoint gets the same CORE here and there: a task's items
are shuffled with random.Random(1337) (always, whether or not --max-per-task keeps only the first N), and the item at
position i of that list takes random.Random(1234 + i).sample(every other position of the list, num_fewshot) as its
examples, from the list as evaluated (after the cut).
Accuracy is centered on the task's random baseline, (acc - b) / (1 - b), so 0 means chance and 1 perfect;
CORE is the mean centered accuracy over the tasks.
"""
import gzip
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastchat_core.common import DataError, is_dist, print0, rank, require_data, world_size

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # the item at position i of the evaluated list draws its examples with Random(FEWSHOT_SEED + i)
SUBSET_SEED = 1337  # every task's items are shuffled with Random(SUBSET_SEED); --max-per-task keeps the first N


# ----------------------------------------------------------------------------------------------------------
# Data


def load_tasks(data_dir=None) -> list[dict]:
    """The entries of core/core_tasks.json (all 22, present or not) under data_dir ($FASTCHAT_DATA by default)."""
    path = Path(data_dir) / "core" / "core_tasks.json" if data_dir else require_data("core", "core_tasks.json")
    if not path.exists():
        raise DataError(f"no CORE task list at {path}: point FASTCHAT_DATA (or data_dir) at the data folder "
                        "that holds core/core_tasks.json")
    tasks = json.loads(path.read_text())["tasks"]
    for t in tasks:
        if t["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"task {t['label']}: unknown icl_task_type {t['icl_task_type']!r}")
    return tasks


def load_items(data_dir, task: dict) -> list[dict]:
    """All items of one task (a gzipped JSON-lines file named by the task's `file`, relative to data_dir)."""
    if data_dir is None:
        data_dir = require_data()
    if not task.get("present", True) or not task.get("file"):
        raise ValueError(f"task {task['label']} has no data file in this data set")
    path = Path(data_dir) / task["file"]
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluation_order(items: list[dict], max_per_task: int | None = None) -> list[dict]:
    """The items as a task evaluates them: shuffled with Random(SUBSET_SEED), the first max_per_task kept."""
    items = list(items)
    random.Random(SUBSET_SEED).shuffle(items)
    return items if max_per_task is None else items[:max_per_task]


def fewshot_examples(items: list[dict], index: int, k: int) -> list[dict]:
    """k items other than items[index] (items: the evaluated list, evaluation_order's), the same ones on every run
    and rank: Random(FEWSHOT_SEED + index).sample of the other positions, as nanochat does."""
    k = min(k, len(items) - 1)
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + index)
    # random.sample picks positions from the population's length alone; sampling range(n - 1) and skipping over the
    # item itself gives the same examples as sampling the list of the other indices
    return [items[j + (j >= index)] for j in rng.sample(range(len(items) - 1), k)]


# ----------------------------------------------------------------------------------------------------------
# Prompts


def render_prompts(item: dict, task_type: str, delimiter: str, fewshot: list[dict]) -> list[str]:
    """The candidate texts of one item: one per choice (multiple_choice) or context option (schema); for
    language_modeling two, the prompt without and with the continuation. Examples are separated by a blank line
    and show their gold answer."""
    if task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{delimiter}"
        # Without the continuation the prompt is stripped: a trailing space would otherwise be its own token here
        # but merge into the continuation's first token in the full text, and the two would share no clean prefix.
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")


def _common_prefix(seqs) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _common_suffix(seqs) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def candidate_spans(token_lists: list[list[int]], task_type: str, max_seq_len: int | None = None):
    """Token sequences to score and, for each, the span [start, end) of tokens whose losses count.

    multiple_choice: after the prefix all choices share; schema: the suffix all options share; language_modeling:
    the full prompt's tokens after what it shares with the prompt without the continuation (only the full prompt
    is returned). Sequences longer than max_seq_len lose tokens from the left, the span shifted with them.
    """
    if task_type == "multiple_choice":
        start = _common_prefix(token_lists)
        spans = [(start, len(s)) for s in token_lists]
    elif task_type == "schema":
        suffix = _common_suffix(token_lists)
        spans = [(len(s) - suffix, len(s)) for s in token_lists]
    elif task_type == "language_modeling":
        without, full = token_lists
        token_lists = [full]
        spans = [(_common_prefix([without, full]), len(full))]
    else:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    seqs, out = [], []
    for s, (start, end) in zip(token_lists, spans):
        start = min(start, end - 1)  # a candidate that is all shared prefix still scores its last token
        crop = max(0, len(s) - max_seq_len) if max_seq_len else 0
        seqs.append(s[crop:])
        out.append((max(1, start - crop), end - crop))  # token 0 has no prediction
    return seqs, out


# ----------------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_candidates(model, seqs, spans, task_type: str, pad_id: int, device=None):
    """One forward over the candidates (padded right); returns (answer, mean losses per candidate).

    answer: index of the lowest mean loss (multiple_choice, schema) or, for language_modeling, whether the
    argmax matched every continuation token.
    """
    if device is None:
        device = _device_of(model)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]   # position t predicts token t + 1
    if task_type == "language_modeling":   # the argmax is needed too: full logits, of one sequence
        logits = model(inputs).float()
        # rows of (B*T, V), not (B, V, T): with the classes not last, CUDA takes a slow strided log-softmax
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    else:   # losses only: the fused head never materializes the (B, T, V) float32 logits
        losses = model(inputs, targets, reduction="none").float()
    means = torch.stack([losses[i, a - 1:b - 1].mean() for i, (a, b) in enumerate(spans)]).tolist()
    if task_type == "language_modeling":
        a, b = spans[0]
        correct = bool((logits[0, a - 1:b - 1].argmax(-1) == targets[0, a - 1:b - 1]).all())
        return correct, means
    return min(range(len(means)), key=means.__getitem__), means


def evaluate_item(model, tokenizer, items, index, task: dict, max_seq_len=None, device=None) -> bool:
    """Whether the model gets items[index] of this task right."""
    item, kind = items[index], task["icl_task_type"]
    fewshot = fewshot_examples(items, index, task.get("num_fewshot", 0))
    texts = render_prompts(item, kind, task.get("continuation_delimiter", " "), fewshot)
    token_lists = tokenizer.encode(texts, prepend=tokenizer.bos_id)
    seqs, spans = candidate_spans(token_lists, kind, max_seq_len)
    answer, _ = score_candidates(model, seqs, spans, kind, tokenizer.bos_id, device)
    return answer if kind == "language_modeling" else answer == item["gold"]


def centered_accuracy(accuracy: float, random_baseline_pct: float) -> float:
    """0 at the random baseline, 1 at perfect accuracy (negative below chance)."""
    b = random_baseline_pct / 100
    return (accuracy - b) / (1 - b)


def evaluate_core(model, tokenizer, data_dir=None, max_per_task=None, device=None, tasks=None) -> dict:
    """CORE of a model: {"tasks": {label: {"accuracy", "centered", "items"}}, "core", "missing", "note"}.

    data_dir: the data root with core/ ($FASTCHAT_DATA by default). max_per_task: evaluate at most this many
    items per task (a fixed random subset). tasks: labels to run (default: every task whose data is present).
    Under torchrun each rank scores every world_size-th item and the counts are summed over ranks.
    """
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1 (or None for every item), got {max_per_task}")
    all_tasks = load_tasks(data_dir)
    by_label = {t["label"]: t for t in all_tasks}
    missing = [t["label"] for t in all_tasks if not t.get("present", True)]
    if tasks is None:
        chosen = [t for t in all_tasks if t.get("present", True)]
    else:
        unknown = [x for x in tasks if x not in by_label or not by_label[x].get("present", True)]
        if unknown:
            available = [t["label"] for t in all_tasks if t.get("present", True)]
            raise ValueError(f"CORE tasks {unknown} are unknown or have no data; choose from {available}")
        chosen = [by_label[x] for x in tasks]
    if device is None:
        device = _device_of(model)
    max_seq_len = model.config.seq_len
    r, world = rank(), world_size()
    cache, results = {}, {}
    for task in chosen:
        t0 = time.perf_counter()
        if task["file"] not in cache:  # hellaswag is two tasks (0- and 10-shot) over one file
            cache[task["file"]] = load_items(data_dir, task)
        items = evaluation_order(cache[task["file"]], max_per_task)
        mine = range(r, len(items), world)
        correct = sum(evaluate_item(model, tokenizer, items, i, task, max_seq_len, device) for i in mine)
        counts = torch.tensor([correct, len(mine)], dtype=torch.float64, device=device)
        if is_dist():
            dist.all_reduce(counts)
        accuracy = (counts[0] / counts[1]).item()
        results[task["label"]] = {"accuracy": accuracy,
                                  "centered": centered_accuracy(accuracy, task["random_baseline_pct"]),
                                  "items": int(counts[1].item())}
        print0(f"CORE {task['label']:<34} acc {accuracy:.4f}  centered {results[task['label']]['centered']:+.4f}  "
               f"({int(counts[1].item())} items, {time.perf_counter() - t0:.1f}s)")
    core = sum(v["centered"] for v in results.values()) / len(results)
    note = f"CORE over {len(results)} of {len(all_tasks)} tasks"
    if missing:
        note += f" ({', '.join(missing)} have no data here): not directly comparable to published CORE numbers"
    return {"tasks": results, "core": core, "missing": missing, "note": note}


def _device_of(model):
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")

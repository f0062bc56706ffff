"""ChatCORE: one number for a chat model, from multiple-choice and generative tasks.

Categorical tasks (ARC, MMLU) read the logits right after <|assistant_start|> and take the most likely of
the allowed letters: no sampling, no parsing. Generative tasks (GSM8K, HumanEval) run greedy decoding
through the continuous-batching Engine, tool calls included, and grade each reply with task.check.
ChatCORE is the mean over tasks of the accuracy centered by chance, (acc - chance) / (1 - chance), where
chance is 1 / (number of choices) for multiple choice and 0 for generative tasks: 0 means no better than
guessing, 1 means perfect. Under torchrun every rank evaluates its share of the problems.
"""
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastchat_core.common import is_dist, rank, world_size
from fastchat_core.engine import SamplingParams

CHATCORE_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")


def load_task(name: str):
    """A ChatCORE task by name, on its evaluation split."""
    from fastchat_core.tasks.arc import ARC
    from fastchat_core.tasks.gsm8k import GSM8K
    from fastchat_core.tasks.humaneval import HumanEval
    from fastchat_core.tasks.mmlu import MMLU
    makers = {"arc_easy": lambda: ARC("easy"), "arc_challenge": lambda: ARC("challenge"),
              "mmlu": lambda: MMLU("test"), "gsm8k": lambda: GSM8K("test"), "humaneval": HumanEval}
    if name not in makers:
        raise ValueError(f"unknown chat task {name!r}; choose from {list(makers)}")
    return makers[name]()


def problem_indices(n: int, max_problems: int | None, seed: int = 0) -> list[int]:
    """All problems, or a seeded random subset of max_problems (files are often sorted by subject, so the
    first N would be unrepresentative); sorted for reproducible batching."""
    if max_problems is None or max_problems >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), max_problems))


@torch.no_grad()
def categorical_scores(model, tokenizer, conversations, batch_size: int = 8) -> list[bool]:
    """Whether the model's most likely allowed letter is the answer, for each conversation."""
    device = next(model.parameters()).device
    limit = model.max_context
    scores = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        # keep the end of an over-long prompt: the question's last lines and <|assistant_start|>
        prompts = [tokenizer.render_for_completion(c["messages"])[-limit:] for c in batch]
        width = max(map(len, prompts))
        x = torch.full((len(prompts), width), tokenizer.bos_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            x[row, :len(p)] = torch.tensor(p)   # right padding: causal attention never looks at it
        last = torch.tensor([len(p) - 1 for p in prompts])
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            h = model.hidden_states(x.to(device))[torch.arange(len(prompts)), last.to(device)]
            # only the final position's logits; the softcap is monotonic, so the argmax skips it
            logits = F.linear(h, model.lm_head.weight).float()
        for c, row in zip(batch, logits):
            ids = [_letter_id(tokenizer, letter) for letter in c["letters"]]
            pick = c["letters"][int(row[ids].argmax())]
            scores.append(pick == c["messages"][-1]["content"])
    return scores


def _letter_id(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"the letter {letter!r} encodes to {len(ids)} tokens; categorical eval needs one")
    return ids[0]


def generative_scores(engine, task, conversations, max_tokens: int = 512) -> list[bool]:
    """Greedy replies from the Engine, graded by task.check. A prompt that leaves no room to answer in the
    model's context (or the engine's KV cache) counts as wrong."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("generative chat tasks need an Engine built with the tokenizer (for tool calls and text)")
    room = engine.max_model_len
    prompts, params, todo = [], [], []
    for k, c in enumerate(conversations):
        prompt = tokenizer.render_for_completion(c["messages"])
        n = min(max_tokens, room - len(prompt))
        if n >= 1:
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=n, temperature=0.0))
            todo.append(k)
    scores = [False] * len(conversations)
    for k, result in zip(todo, engine.generate(prompts, params) if prompts else []):
        scores[k] = task.check(conversations[k], result.text)
    return scores


def evaluate_task(model, tokenizer, task, max_problems=None, engine=None, max_tokens: int = 512,
                  batch_size: int = 8) -> tuple[float, float]:
    """(accuracy, chance accuracy) of one task; sharded over ranks and reduced under torchrun."""
    indices = problem_indices(len(task), max_problems)[rank()::world_size()]
    conversations = [task[i] for i in indices]
    if task.eval_type == "categorical":
        scores = categorical_scores(model, tokenizer, conversations, batch_size)
        chance = sum(1 / len(c["letters"]) for c in conversations)
    elif task.eval_type == "generative":
        scores = generative_scores(engine, task, conversations, max_tokens)
        chance = 0.0
    else:
        raise ValueError(f"{type(task).__name__} is a training-only task: it has no evaluation")
    # on the model's device: NCCL (GPU runs) reduces only device tensors
    totals = torch.tensor([sum(scores), chance, len(scores)], dtype=torch.float64,
                          device=next(model.parameters()).device)
    if is_dist():
        dist.all_reduce(totals)
    correct, chance, n = totals.tolist()
    if n == 0:
        raise ValueError(f"no problems to evaluate in {type(task).__name__}")
    return correct / n, chance / n


def chatcore(model, tokenizer, tasks=CHATCORE_TASKS, max_problems=None, engine=None, max_tokens: int = 512,
             batch_size: int = 8) -> dict:
    """Accuracy of each task plus "chatcore", the mean of the chance-centered accuracies.

    tasks: names (see load_task) or Task objects; max_problems: a seeded subset of each task (None = all);
    engine: an Engine over `model` for the generative tasks (built when needed and not given). The model's
    train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        results, centered = {}, []
        for t in tasks:
            task = load_task(t) if isinstance(t, str) else t
            name = t if isinstance(t, str) else type(task).__name__.lower()
            if task.eval_type == "generative" and engine is None:
                from fastchat_core.engine import Engine
                engine = Engine(model, tokenizer)
            acc, chance = evaluate_task(model, tokenizer, task, max_problems, engine, max_tokens, batch_size)
            results[name] = acc
            centered.append((acc - chance) / (1 - chance))
        results["chatcore"] = sum(centered) / len(centered)
        return results
    finally:
        model.train(was_training)

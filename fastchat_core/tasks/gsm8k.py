"""GSM8K grade-school math word problems, with the calculator steps turned into tool calls.

A reference solution marks each computation as <<expr=result>>: "She sold 48/2 = <<48/2=24>>24 clips". The
assistant turn becomes parts: the text up to the marker, a python part `48/2`, a python_output part with
what the engine's calculator prints for it (tools.calculator: "24.0"), then the text after the marker.
Training on the tool's real output, not the annotation's rounded "24", shows the model exactly what it
will see at inference. The final answer follows "#### ". Generative eval: the number after "####" in the
model's reply must equal the reference's.
"""
import re

from fastchat_core import tools
from fastchat_core.tasks.base import Task, read_jsonl

_STEP = re.compile(r"<<([^<>]*)>>")
_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")


def gsm8k_conversation(question: str, solution: str) -> dict:
    """A GSM8K item as a conversation with calculator tool calls; "answer" holds the final number."""
    parts, pos = [], 0
    for m in _STEP.finditer(solution):
        expr, eq, result = m.group(1).rpartition("=")
        if not eq:   # a marker without "=" has no result to show: keep it as plain text
            continue
        parts.append({"type": "text", "text": solution[pos:m.start()]})
        parts.append({"type": "python", "text": expr})
        output = tools.calculator(expr)
        parts.append({"type": "python_output", "text": result if output is None else output})
        pos = m.end()
    parts.append({"type": "text", "text": solution[pos:]})
    parts = [p for p in parts if p["text"]]
    answer = extract_answer(solution)
    if answer is None:
        raise ValueError(f"GSM8K solution has no '#### <number>' final answer: {solution[-80:]!r}")
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": answer}


def extract_answer(text: str) -> str | None:
    """The number after the first "####" (thousands commas and a trailing period dropped), or None."""
    m = _ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def same_number(a: str | None, b: str | None) -> bool:
    """Equal as numbers ("18" == "18.00"); False when either is missing."""
    if a is None or b is None:
        return False
    return float(a) == float(b)


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train"):
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.items = read_jsonl("gsm8k", f"{split}.jsonl.gz")

    def __len__(self):
        return len(self.items)

    def get(self, i):
        r = self.items[i]
        return gsm8k_conversation(r["question"], r["answer"])

    def check(self, conversation, reply):
        return same_number(extract_answer(reply), conversation["answer"])

"""HumanEval (164 Python functions with unit tests): generative eval only.

The user turn is the problem's prompt (signature + docstring); the reference reply is the whole function.
A reply passes when prompt + reply + the tests + check(entry_point) runs cleanly in the sandbox. Both reply
styles work: a bare body continues the prompt's function, and a full `def` (what chat models usually
write) redefines it, since the prompt's docstring alone is a valid function body.
"""
import re

from fastchat_core import tools
from fastchat_core.tasks.base import Task, read_jsonl

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The first ``` fenced block of a reply (an unclosed one runs to the end), else the whole reply."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def humaneval_program(item: dict, completion: str) -> str:
    """The program that tests a completion: prompt, completion, the test code, and the check call."""
    return f"{item['prompt']}{completion}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self):
        self.items = read_jsonl("humaneval", "HumanEval.jsonl.gz")

    def __len__(self):
        return len(self.items)

    def get(self, i):
        r = self.items[i]
        return {"messages": [{"role": "user", "content": r["prompt"]},
                             {"role": "assistant", "content": r["prompt"] + r["canonical_solution"]}],
                "task_id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"]}

    def check(self, conversation, reply, timeout: float = 5.0):
        passed, _ = tools.check_program(humaneval_program(conversation, extract_code(reply)), timeout=timeout)
        return passed

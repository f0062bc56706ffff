"""HumanEval (164 Python functions with unit tests): generative eval only.

The user turn is the problem's prompt (signature + docstring); the reference reply is the whole function.
A reply passes when the problem's tests pass against prompt + reply in the sandbox. The tests run apart
from the reply's code (tools.check_program with tests=), so a reply cannot fake a pass. Both reply styles
work: a bare body continues the prompt's function, and a full `def` (what chat models usually write)
redefines it, since the prompt's docstring alone is a valid function body.
"""
import re

from fastchat_core import tools
from fastchat_core.tasks.base import Task, read_jsonl

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The first ``` fenced block of a reply (an unclosed one runs to the end), else the whole reply."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def check_completion(item: dict, completion: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Run the item's tests against prompt + completion. The tests get the prompt too: some call its helpers."""
    return tools.check_program(item["prompt"] + completion, timeout=timeout,
                               tests=f"{item['prompt']}\n\n{item['test']}\n", entry_point=item["entry_point"])


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
        return check_completion(conversation, extract_code(reply), timeout)[0]

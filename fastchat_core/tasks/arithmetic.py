"""Generated arithmetic with the calculator tool: "What is 37 * 48?" -> a python call, its output, the answer.

This teaches the tool-call format on its own (GSM8K teaches it inside word problems) and works without any
data files. The python_output part is tools.calculator's output, exactly what the engine pastes at inference.
Conversation i depends only on (seed, i).
"""
import random

from fastchat_core import tools
from fastchat_core.tasks.base import GeneratedTask

QUESTIONS = ("What is {expr}?", "Compute {expr}.", "Calculate {expr}", "what's {expr}", "Please work out {expr}.",
             "{expr} = ?")


def _expression(rng: random.Random) -> str:
    """Two or three operands, sized so that the answer is too long to guess but easy to check."""
    def operand():
        return str(rng.choice([rng.randint(2, 99), rng.randint(100, 9999), rng.randint(10, 999)]))

    expr = f"{operand()} {rng.choice('+-*/')} {operand()}"
    if rng.random() < 0.3:
        expr = f"({expr}) {rng.choice('+-*')} {operand()}"
    return expr


class Arithmetic(GeneratedTask):
    kind = "arithmetic"

    def make(self, rng):
        expr = _expression(rng)
        result = tools.calculator(expr)
        parts = [{"type": "text", "text": "Let me use the calculator: "},
                 {"type": "python", "text": expr.replace(" ", "")},
                 {"type": "python_output", "text": result},
                 {"type": "text", "text": f"\n\n{expr} = {result}"}]
        return {"messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(expr=expr)},
                             {"role": "assistant", "content": parts}],
                "answer": result}

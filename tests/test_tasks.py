"""Chat tasks: GSM8K tool-call conversion and answer extraction, rendering with the loss mask, MMLU/ARC
letters, mixtures, HumanEval grading, the generated tasks' tool outputs, and ChatCORE on a tiny model."""
import concurrent.futures
import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import records, tiny_gpt
from fastchat_core import tools
from fastchat_core.common import DataError
from fastchat_core.eval.chat import categorical_scores, chatcore, problem_indices
from fastchat_core.tasks.arc import ARC
from fastchat_core.tasks.arithmetic import Arithmetic
from fastchat_core.tasks.base import ListTask, TaskMixture, multiple_choice
from fastchat_core.tasks.conversations import VAL_EVERY, Conversations
from fastchat_core.tasks.gsm8k import GSM8K, extract_answer, gsm8k_conversation, same_number
from fastchat_core.tasks.humaneval import HumanEval, check_completion, extract_code
from fastchat_core.tasks.identity import Identity
from fastchat_core.tasks.mmlu import MMLU
from fastchat_core.tasks.spelling import Spelling, SpellingCount

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- GSM8K ------------------------------------------------------------------------------------------------

def test_gsm8k_conversion_of_a_real_item(data_dir):
    raw = json.loads(gzip.open(Path(data_dir) / "gsm8k" / "train.jsonl.gz", "rt").readline())
    steps = re.findall(r"<<([^<>]*)=([^<>=]*)>>", raw["answer"])
    assert len(steps) >= 2
    conv = GSM8K("train")[0]
    assert conv == gsm8k_conversation(raw["question"], raw["answer"])
    user, assistant = conv["messages"]
    assert user == {"role": "user", "content": raw["question"]}
    parts = assistant["content"]
    calls = [p["text"] for p in parts if p["type"] == "python"]
    outputs = [p["text"] for p in parts if p["type"] == "python_output"]
    assert calls == [expr for expr, _ in steps]
    # the outputs are what the engine's calculator will paste, and they agree with the annotations
    assert outputs == [tools.calculator(expr) for expr, _ in steps]
    assert all(float(out) == float(res) for out, (_, res) in zip(outputs, steps))
    # every python part is followed by its output; the text is the solution with the markers removed
    kinds = [p["type"] for p in parts]
    assert all(kinds[i + 1] == "python_output" for i, k in enumerate(kinds) if k == "python")
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    assert text == re.sub(r"<<[^<>]*>>", "", raw["answer"])
    assert text.endswith("#### " + conv["answer"]) and conv["answer"] == raw["answer"].split("#### ")[-1]


@pytest.mark.parametrize("text, answer", [
    ("so she has 18 left.\n#### 18", "18"),
    ("#### 1,234,567", "1234567"),
    ("The temperature fell to\n#### -12", "-12"),
    ("#### 3.75", "3.75"),
    ("She pays $2,000.50 in total.\n#### $2,000.50.", "2000.50"),
    ("#### 7\n#### 8", "7"),   # the first answer counts
    ("I think it is 42.", None),
    ("#### none", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_gsm8k_check_compares_numbers(data_dir):
    task = GSM8K("test")
    conv = task[0]
    ref = conv["answer"]
    assert task.check(conv, f"blah blah\n#### {int(ref):,}.00")
    assert not task.check(conv, f"#### {int(ref) + 1}")
    assert not task.check(conv, f"the answer is {ref}")   # no #### marker: not graded as an answer
    assert same_number("18", "18.0") and not same_number(None, "18")


def test_gsm8k_render_and_mask_token_by_token(tok, data_dir):
    conv = GSM8K("train")[0]
    ids, mask = tok.render_conversation(conv["messages"], max_tokens=None)
    sp = tok.encode_special
    expect_ids, expect_mask = [sp("<|bos|>")], [0]

    def add(tokens, trained):
        expect_ids.extend(tokens)
        expect_mask.extend([trained] * len(tokens))

    add([sp("<|user_start|>"), *tok.encode(conv["messages"][0]["content"]), sp("<|user_end|>")], 0)
    add([sp("<|assistant_start|>")], 0)
    for part in conv["messages"][1]["content"]:
        if part["type"] == "text":
            add(tok.encode(part["text"]), 1)
        elif part["type"] == "python":   # the model writes the tool call: trained
            add([sp("<|python_start|>"), *tok.encode(part["text"]), sp("<|python_end|>")], 1)
        else:                            # the tool writes its output: not trained
            add([sp("<|output_start|>"), *tok.encode(part["text"]), sp("<|output_end|>")], 0)
    add([sp("<|assistant_end|>")], 1)
    assert ids == expect_ids and mask == expect_mask
    # spot checks that do not depend on how the expectation was built
    text = tok.decode(ids)
    assert "<|python_start|>48/2<|python_end|><|output_start|>24.0<|output_end|>24 clips" in text
    inside_output = False
    for t, m in zip(ids, mask):
        if t == sp("<|output_start|>"):
            inside_output = True
        if inside_output:
            assert m == 0
        if t == sp("<|output_end|>"):
            inside_output = False
    assert mask[ids.index(sp("<|python_start|>"))] == 1 and mask[-1] == 1


# ---- multiple choice ----------------------------------------------------------------------------------------

def test_mmlu_rendering(tok, data_dir):
    raw = [json.loads(line) for line in gzip.open(Path(data_dir) / "mmlu" / "dev.jsonl.gz", "rt")]
    task = MMLU("dev")
    assert len(task) == len(raw)   # the full set's 285: test_full_data
    for k in (0, len(raw) // 2, len(raw) - 1):
        conv, r = task[k], raw[k]
        user = conv["messages"][0]["content"]
        assert r["question"] in user
        for letter, choice in zip("ABCD", r["choices"]):
            assert f"\n{letter}. {choice}\n" in user
        assert conv["letters"] == ["A", "B", "C", "D"]
        assert conv["messages"][1]["content"] == "ABCD"[r["answer"]]
        assert conv["subject"] == r["subject"]
        prompt = tok.render_for_completion(conv["messages"])
        assert prompt[-1] == tok.encode_special("<|assistant_start|>")
        ids, mask = tok.render_conversation(conv["messages"])
        # the trained tokens are exactly the answer letter and <|assistant_end|>
        assert [t for t, m in zip(ids, mask) if m] == tok.encode(conv["messages"][1]["content"]) + \
            [tok.encode_special("<|assistant_end|>")]
    assert len(MMLU("dev", subject="anatomy")) == 5
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        MMLU("dev", subject="astrology")


def test_arc_rendering(data_dir):
    raw = json.loads(gzip.open(Path(data_dir) / "arc" / "arc_challenge_test.jsonl.gz", "rt").readline())
    conv = ARC("challenge")[0]
    assert conv["messages"][1]["content"] == raw["answerKey"]
    for label, text in zip(raw["choices"]["label"], raw["choices"]["text"]):
        assert f"{label}. {text}" in conv["messages"][0]["content"]
    assert len(ARC("easy")) == records(data_dir, "arc", "arc_easy_test.jsonl.gz")   # 2376: test_full_data
    with pytest.raises(DataError, match="missing data"):
        ARC("easy", split="train")   # ARC has no train split here: it is never trained on


def test_multiple_choice_validates():
    conv = multiple_choice("2 + 2?", ["3", "4", "5"], 1)
    assert conv["letters"] == ["A", "B", "C"] and conv["messages"][1]["content"] == "B"
    with pytest.raises(ValueError, match="answer index"):
        multiple_choice("q", ["a", "b"], 2)


# ---- mixtures -------------------------------------------------------------------------------------------

def _tagged(name, n):
    return ListTask([{"messages": [{"role": "user", "content": f"{name}{i}"}]} for i in range(n)])


def _contents(task):
    return [c["messages"][0]["content"] for c in task]


def test_mixture_is_deterministic_and_weighted():
    a, b = _tagged("a", 10), _tagged("b", 20)
    mix = TaskMixture([a, b], weights=[2.0, 0.5], epochs=3, seed=7)
    again = TaskMixture([a, b], weights=[2.0, 0.5], epochs=3, seed=7)
    other = TaskMixture([a, b], weights=[2.0, 0.5], epochs=3, seed=8)
    assert _contents(mix) == _contents(again)
    assert _contents(mix) != _contents(other)
    per_epoch = 2 * 10 + 10
    assert len(mix) == 3 * per_epoch
    epochs = [_contents(mix)[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    for epoch in epochs:
        assert sorted(x for x in epoch if x[0] == "a") == sorted(f"a{i}" for i in range(10) for _ in range(2))
        bs = [x for x in epoch if x[0] == "b"]
        assert len(bs) == 10 and len(set(bs)) == 10   # half of b, without repeats
    assert epochs[0] != epochs[1]   # each epoch shuffled anew
    assert mix[-1] == mix[len(mix) - 1]
    with pytest.raises(IndexError):
        mix[len(mix)]
    with pytest.raises(ValueError, match="one weight per task"):
        TaskMixture([a, b], weights=[1.0])


# ---- HumanEval ------------------------------------------------------------------------------------------

def test_humaneval_canonical_passes_and_wrong_fails(data_dir):
    task = HumanEval()
    assert len(task) == records(data_dir, "humaneval", "HumanEval.jsonl.gz")   # 164: test_full_data
    with gzip.open(Path(data_dir) / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        items = [json.loads(next(f)) for _ in range(2)]
    for i, item in enumerate(items):
        conv = task[i]
        body = item["canonical_solution"]
        assert task.check(conv, body)                                    # a bare body continues the prompt
        assert task.check(conv, f"Here you go:\n```python\n{conv['messages'][1]['content']}```\nDone.")
        assert not task.check(conv, "    return None\n")
        assert not task.check(conv, body.replace("return", "return not", 1))


def test_humaneval_every_canonical_solution_passes_the_split_judge(data_dir):
    """The tests run apart from the solution (tools.check_program with tests=): every reference solution must
    still pass, including the items whose tests call the entry point by name or the prompt's helpers."""
    task = HumanEval()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda item: check_completion(item, item["canonical_solution"]), task.items))
    assert [r for r in results if not r[0]] == []
    reward_hack = "    import os\n    os._exit(0)\n"   # passed the one-program form before the split
    assert [check_completion(item, reward_hack)[0] for item in task.items[:8]] == [False] * 8


def test_extract_code():
    assert extract_code("x\n```python\ndef f():\n    return 1\n```\ny") == "def f():\n    return 1\n"
    assert extract_code("```\nprint(1)") == "print(1)"      # unclosed fence: to the end
    assert extract_code("    return 1\n") == "    return 1\n"


# ---- generated tasks and chat data ------------------------------------------------------------------------

def test_generated_tool_outputs_match_the_tools(tok):
    """The python_output parts are what the engine would paste: the sandbox's REPL output."""
    for task in (SpellingCount(20, seed=3), Spelling(20, seed=3)):
        conv = task[5]
        parts = conv["messages"][1]["content"]
        code = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert tools.calculator(code) is None and tools.run_python(code).output == output
    for i in range(20):
        conv = SpellingCount(20, seed=3)[i]
        word = re.search(r"Spelling (\w+) out", conv["messages"][1]["content"][0]["text"]).group(1)
        letter = re.search(r"count\('(\w)'\)", conv["messages"][1]["content"][1]["text"]).group(1)
        assert conv["answer"] == word.count(letter)
        arith = Arithmetic(20, seed=3)[i]
        parts = arith["messages"][1]["content"]
        assert parts[2]["text"] == tools.calculator(parts[1]["text"]) == arith["answer"]
        assert float(arith["answer"]) == pytest.approx(eval(parts[1]["text"]))
    for task in (SpellingCount(50), Spelling(50), Identity(50), Arithmetic(50)):
        for conv in task:
            ids, mask = tok.render_conversation(conv["messages"])
            assert sum(mask) > 0
        assert task[7] == type(task)(50)[7]                  # a function of (seed, i) only
        assert _render(task, seed=0) != _render(task, seed=1)


def _render(task, seed):
    return [json.dumps(c) for c in type(task)(len(task), seed)]


def test_conversations_splits(data_dir):
    n = sum(1 for _ in gzip.open(Path(data_dir) / "chat" / "self_instruct_human_written.jsonl.gz", "rt"))
    train, val = Conversations("self_instruct_human_written"), Conversations("self_instruct_human_written", "val")
    assert len(val) == n // VAL_EVERY and len(train) + len(val) == n
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}
    assert set(train[0]) == {"messages"} and train[0]["messages"][0]["role"] == "user"
    with pytest.raises(ValueError, match="unknown chat source"):
        Conversations("alpaca")


# ---- ChatCORE -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tok):
    return tiny_gpt(tok.vocab_size, seq_len=256).eval()


def test_categorical_scores_match_unbatched_logits(tok, tiny_model, data_dir):
    task = MMLU("test")
    convs = [task[i] for i in problem_indices(len(task), 6)]
    got = categorical_scores(tiny_model, tok, convs, batch_size=4)   # ragged batches, right padding
    for conv, score in zip(convs, got):
        prompt = tok.render_for_completion(conv["messages"])[-tiny_model.cos.size(0):]
        logits = tiny_model(torch.tensor([prompt]))[0, -1]
        letter_ids = [tok.encode(x)[0] for x in conv["letters"]]
        pick = conv["letters"][int(logits[letter_ids].argmax())]
        assert score == (pick == conv["messages"][-1]["content"])


def test_chatcore_on_a_tiny_model(tok, tiny_model, data_dir):
    tiny_model.train()
    out = chatcore(tiny_model, tok, max_problems=5, max_tokens=48)
    assert tiny_model.training   # mode restored
    names = ["arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"]
    assert list(out) == names + ["chatcore"]
    assert all(0.0 <= out[n] <= 1.0 for n in names)
    centered = [(out[n] - 0.25) / 0.75 for n in names[:3]] + [out["gsm8k"], out["humaneval"]]
    assert out["chatcore"] == pytest.approx(sum(centered) / 5)
    with pytest.raises(ValueError, match="training-only"):
        chatcore(tiny_model, tok, tasks=[Identity(5)])

"""Integration layer: the full data set ($FASTCHAT_DATA, CI sets it to ../shared/data). Its sizes are the official
ones (../shared/data/README.md), the tasks load all of it, and the suite's fixtures (tests/data) are exactly what
tests/data/make_fixtures.py makes from it. Skipped without FASTCHAT_DATA; every other test runs on the fixtures
then, and on the full set when it is given."""
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import FIXTURE_DATA, records

SIZES = {
    "gsm8k/train.jsonl.gz": 7473, "gsm8k/test.jsonl.gz": 1319,
    "humaneval/HumanEval.jsonl.gz": 164,
    "mmlu/test.jsonl.gz": 14042, "mmlu/dev.jsonl.gz": 285,
    "arc/arc_easy_test.jsonl.gz": 2376, "arc/arc_challenge_test.jsonl.gz": 1172,
    "core/copa.jsonl.gz": 100, "core/hellaswag.jsonl.gz": 10042,
    "chat/sgd_dialogues.jsonl.gz": 17193, "chat/taskmaster4_coffee.jsonl.gz": 3710,
    "chat/self_instruct_human_written.jsonl.gz": 427, "chat/gpteacher_codegen.jsonl.gz": 4535,
    **{f"pretrain/shard_00{i}.jsonl.gz": n for i, n in enumerate((1439, 1481, 1475, 1522, 1369, 1433))},
}


@pytest.mark.parametrize("path", sorted(SIZES))
def test_official_sizes(full_data_dir, path):
    assert records(full_data_dir, path) == SIZES[path]


def test_core_task_list_counts_its_files(full_data_dir):
    from fastchat_core.eval import core
    tasks = core.load_tasks(full_data_dir)
    assert len(tasks) == 22 and sum(t["present"] for t in tasks) == 19
    for t in tasks:
        if t["present"]:
            assert records(full_data_dir, t["file"]) == t["records"], t["label"]


def test_tasks_load_every_item(full_data_dir):
    from fastchat_core.tasks.arc import ARC
    from fastchat_core.tasks.conversations import VAL_EVERY, Conversations
    from fastchat_core.tasks.gsm8k import GSM8K
    from fastchat_core.tasks.humaneval import HumanEval
    from fastchat_core.tasks.mmlu import MMLU
    from fastchat_core.train import rl
    assert len(HumanEval()) == 164
    assert (len(MMLU("test")), len(MMLU("dev")), len(MMLU("dev", subject="anatomy"))) == (14042, 285, 5)
    assert len({c["subject"] for c in MMLU("dev")}) == 57
    assert (len(ARC("easy")), len(ARC("challenge"))) == (2376, 1172)
    assert (len(GSM8K("train")), len(GSM8K("test"))) == (7473, 1319)
    assert [len(x) for x in rl.load_gsm8k("test")] == [1319, 1319]
    # SGD keeps its own splits (12174 train, 2098 dev; its test dialogues are left out); the rest every 50th
    assert (len(Conversations("sgd_dialogues")), len(Conversations("sgd_dialogues", "val"))) == (12174, 2098)
    assert len(Conversations("self_instruct_human_written", "val")) == 427 // VAL_EVERY


def test_fixtures_are_what_make_fixtures_makes(full_data_dir, tmp_path):
    """Regenerating tests/data from the full set changes nothing (else: run tests/data/make_fixtures.py)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURE_DATA / "make_fixtures.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    made = make.build(Path(full_data_dir), tmp_path)
    assert sum(made.values()) > 0
    rel = [p.relative_to(tmp_path) for p in make.data_files(tmp_path)]
    assert rel == [p.relative_to(FIXTURE_DATA) for p in make.data_files(FIXTURE_DATA)]
    for r in rel:
        assert (tmp_path / r).read_bytes() == (FIXTURE_DATA / r).read_bytes(), f"tests/data/{r} is stale"
    fixture_tasks = json.loads((FIXTURE_DATA / "core" / "core_tasks.json").read_text())["tasks"]
    assert all(t["records"] == records(FIXTURE_DATA, t["file"]) for t in fixture_tasks if t["present"])

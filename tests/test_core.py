"""CORE: prompt rendering, candidate spans, scoring against hand-computed losses, centering, real data, and
end-to-end runs (a tiny random GPT on real tasks; two gloo ranks against one process)."""
import gzip
import json
import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from conftest import save_tiny_run, tiny_gpt
from fastchat_core.eval import core

torch.set_num_threads(1)

# ---- a model whose per-token losses are known exactly ------------------------------------------------------
# Character tokens; id 0 is BOS. The model is a bigram table: after character a it gives probability 1/2 to one
# favoured next character and spreads the other 1/2 evenly, so a token costs HIT = ln 2 when it is the favoured
# one and MISS = ln(2 (V - 1)) otherwise, whatever came before.
ALPHABET = "\x00 abcdqxyz\n"
FAVOURED = {"\x00": "q", " ": "a", "a": "b", "b": "c", "c": "d", "d": " ", "q": " ", "x": "y", "y": "z",
            "z": " ", "\n": "q"}
V = len(ALPHABET)
HIT, MISS = math.log(2), math.log(2 * (V - 1))


class CharTokenizer:
    bos_id = 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [ALPHABET.index(c) for c in text]


class BigramModel(nn.Module):
    def __init__(self, seq_len=64):
        super().__init__()
        table = torch.full((V, V), math.log(0.5 / (V - 1)))
        for a, b in FAVOURED.items():
            table[ALPHABET.index(a), ALPHABET.index(b)] = math.log(0.5)
        self.register_buffer("table", table)
        self.config = SimpleNamespace(seq_len=seq_len)
        self.inputs = []

    def forward(self, idx, targets=None, reduction="mean"):
        """GPT's contract: logits, or with targets the losses (per token for reduction="none")."""
        # the whole sequences scored (with targets, the inputs are all but their last token)
        self.inputs.append(idx.clone() if targets is None else torch.cat([idx, targets[:, -1:]], 1))
        logits = self.table[idx]
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction).view(targets.shape)


def mc(query, choices, gold):
    return {"query": query, "choices": choices, "gold": gold}


# Two items per task type: the first right, the second wrong (the comments give each candidate's tokens' costs).
MC_ITEMS = [
    mc("q", ["abc", "acb", "xyz"], 0),  # abc: H H H | acb: H M M | xyz: M H H   -> picks 0, right
    mc("q", ["xyz", "abcd"], 0),        # xyz: M H H | abcd: H H H H             -> picks 1, wrong
]
SCHEMA_ITEMS = [
    {"context_options": ["xq", "xa"], "continuation": "bc", "gold": 0},  # " bc" after q: H M H | after a: M M H
    {"context_options": ["xa", "xd"], "continuation": "ab", "gold": 0},  # " ab" after a: M H H | after d: H H H
]
LM_ITEMS = [
    {"context": "q", "continuation": "abc"},   # " abc": every token is the argmax -> right
    {"context": "q ", "continuation": "abd"},  # d after b is not the argmax -> wrong
]


def score(item, kind, max_seq_len=None, fewshot=(), delimiter=" ", model=None):
    model = model or BigramModel()
    texts = core.render_prompts(item, kind, delimiter, list(fewshot))
    seqs, spans = core.candidate_spans(CharTokenizer().encode(texts, prepend=0), kind, max_seq_len)
    return core.score_candidates(model, seqs, spans, kind, pad_id=0), seqs, spans


def test_multiple_choice_picks_lowest_mean_loss_after_common_prefix():
    (answer, means), seqs, spans = score(MC_ITEMS[0], "multiple_choice")
    assert spans == [(3, 6)] * 3  # BOS q " " is shared; each choice's 3 tokens count
    assert answer == 0
    assert means == pytest.approx([HIT, (HIT + 2 * MISS) / 3, (2 * HIT + MISS) / 3])
    (answer, means), _, spans = score(MC_ITEMS[1], "multiple_choice")
    assert spans == [(3, 6), (3, 7)]
    assert answer == 1 and means == pytest.approx([(MISS + 2 * HIT) / 3, HIT])


def test_schema_scores_shared_continuation_under_each_context():
    (answer, means), _, spans = score(SCHEMA_ITEMS[0], "schema")
    assert spans == [(3, 6), (3, 6)]  # the shared suffix " bc"
    assert answer == 0 and means == pytest.approx([(2 * HIT + MISS) / 3, (HIT + 2 * MISS) / 3])
    (answer, means), _, _ = score(SCHEMA_ITEMS[1], "schema")
    assert answer == 1 and means == pytest.approx([(2 * HIT + MISS) / 3, HIT])


def test_language_modeling_needs_every_token_to_be_the_argmax():
    (correct, means), seqs, spans = score(LM_ITEMS[0], "language_modeling")
    assert len(seqs) == 1 and spans == [(2, 6)]  # BOS q | " abc"
    assert correct is True and means == pytest.approx([HIT])
    (correct, means), _, spans = score(LM_ITEMS[1], "language_modeling")
    assert spans == [(2, 6)]  # the context's trailing space is stripped, not scored twice
    assert correct is False and means == pytest.approx([(3 * HIT + MISS) / 4])


def test_candidates_are_batched_padded_right_in_one_forward():
    model = BigramModel()
    score(MC_ITEMS[1], "multiple_choice", model=model)
    assert len(model.inputs) == 1
    (ids,) = model.inputs
    assert ids.shape == (2, 7)
    assert ids[0, 6].item() == 0  # the shorter candidate is padded on the right


def test_left_truncation_keeps_the_scored_span():
    shots = [mc("q", ["ab", "xy"], 1), mc("q", ["a", "b"], 0)]
    full_model, cut_model = BigramModel(), BigramModel()
    (a_full, m_full), seqs_full, _ = score(MC_ITEMS[0], "multiple_choice", fewshot=shots, model=full_model)
    (a_cut, m_cut), seqs_cut, spans = score(MC_ITEMS[0], "multiple_choice", 5, fewshot=shots, model=cut_model)
    assert max(len(s) for s in seqs_full) > 5 and cut_model.inputs[0].shape[1] == 5
    assert [s[-5:] for s in seqs_full] == seqs_cut  # tokens were dropped from the left
    assert spans == [(2, 5)] * 3
    # a bigram model's losses on the span do not depend on what was cut off
    assert a_cut == a_full == 0 and m_cut == pytest.approx(m_full)


def test_render_prompts_formats():
    item, shot = mc("Q2", ["c1", "c2"], 1), mc("Q1", ["a", "b"], 1)
    assert core.render_prompts(item, "multiple_choice", "\nAnswer: ", [shot]) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c1", "Q1\nAnswer: b\n\nQ2\nAnswer: c2"]
    item = {"context_options": ["B1", "B2"], "continuation": "k2", "gold": 0}
    shot = {"context_options": ["A1", "A2"], "continuation": "k1", "gold": 1}
    assert core.render_prompts(item, "schema", " ", [shot]) == ["A2 k1\n\nB1 k2", "A2 k1\n\nB2 k2"]
    item, shot = {"context": "ctx2 ", "continuation": "c2"}, {"context": " ctx1\n", "continuation": "c1"}
    assert core.render_prompts(item, "language_modeling", " ", [shot]) == ["ctx1 c1\n\nctx2", "ctx1 c1\n\nctx2 c2"]
    with pytest.raises(ValueError, match="unknown task type"):
        core.render_prompts(item, "generation", " ", [])


def test_fewshot_examples_are_fixed_and_exclude_the_item():
    items = [{"id": i} for i in range(20)]
    for index in (0, 7, 19):
        shots = core.fewshot_examples(items, index, 10)
        ids = [s["id"] for s in shots]
        assert len(set(ids)) == 10 and index not in ids
        assert shots == core.fewshot_examples(items, index, 10)  # the same on every call (and rank)
    assert core.fewshot_examples(items, 0, 10) != core.fewshot_examples(items, 1, 10)
    assert [s["id"] for s in core.fewshot_examples(items[:3], 1, 10)] in ([0, 2], [2, 0])  # capped at n - 1
    assert core.fewshot_examples(items, 3, 0) == []


def test_centered_accuracy():
    assert core.centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert core.centered_accuracy(1.0, 25.0) == pytest.approx(1.0)
    assert core.centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert core.centered_accuracy(0.5, 0.0) == pytest.approx(0.5)
    assert core.centered_accuracy(0.5, 62.0) == pytest.approx(-0.12 / 0.38)  # below chance is negative


# ---- evaluate_core on a hand-made task folder ----------------------------------------------------------------


def write_tasks(root: Path, num_fewshot=1):
    (root / "core").mkdir(parents=True)
    specs = [("mc", "multiple_choice", MC_ITEMS, 25.0), ("schema", "schema", SCHEMA_ITEMS, 50.0),
             ("lm", "language_modeling", LM_ITEMS, 0.0)]
    tasks = []
    for label, kind, items, baseline in specs:
        with gzip.open(root / "core" / f"{label}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(it) + "\n" for it in items)
        tasks.append({"label": label, "file": f"core/{label}.jsonl.gz", "present": True, "icl_task_type": kind,
                      "num_fewshot": num_fewshot, "continuation_delimiter": " ", "random_baseline_pct": baseline})
    tasks.append({"label": "absent", "file": None, "present": False, "icl_task_type": "language_modeling",
                  "num_fewshot": 0, "continuation_delimiter": " ", "random_baseline_pct": 0.0})
    (root / "core" / "core_tasks.json").write_text(json.dumps({"tasks": tasks}))
    return root


# Each task: one of two right. Centered: (0.5 - 0.25) / 0.75, (0.5 - 0.5) / 0.5, 0.5.
EXPECTED_CENTERED = {"mc": 1 / 3, "schema": 0.0, "lm": 0.5}


def test_evaluate_core_hand_made_tasks(tmp_path):
    # the one few-shot example is common to every candidate, so the bigram model's answers do not change
    out = core.evaluate_core(BigramModel(), CharTokenizer(), write_tasks(tmp_path))
    assert {k: v["accuracy"] for k, v in out["tasks"].items()} == {"mc": 0.5, "schema": 0.5, "lm": 0.5}
    assert {k: v["centered"] for k, v in out["tasks"].items()} == pytest.approx(EXPECTED_CENTERED)
    assert all(v["items"] == 2 for v in out["tasks"].values())
    assert out["core"] == pytest.approx((1 / 3 + 0 + 0.5) / 3)
    assert out["missing"] == ["absent"] and "3 of 4 tasks" in out["note"] and "absent" in out["note"]

    one = core.evaluate_core(BigramModel(), CharTokenizer(), tmp_path, max_per_task=1, tasks=["lm"])
    assert list(one["tasks"]) == ["lm"] and one["tasks"]["lm"]["items"] == 1
    with pytest.raises(ValueError, match="unknown or have no data"):
        core.evaluate_core(BigramModel(), CharTokenizer(), tmp_path, tasks=["absent"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(r, world, port, root, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=world)
    try:
        model = BigramModel()
        out = core.evaluate_core(model, CharTokenizer(), root)
        seen = len(model.inputs)  # one forward per item this rank scored
        Path(out_dir, f"rank{r}.json").write_text(json.dumps({"result": out, "forwards": seen}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_items_and_sum_counts(tmp_path):
    root = write_tasks(tmp_path / "data")
    mp.spawn(_rank_main, args=(2, _free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    single = core.evaluate_core(BigramModel(), CharTokenizer(), root)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["forwards"] == 3  # each rank scored one item of each task's two
        assert got["result"]["tasks"] == single["tasks"] and got["result"]["core"] == pytest.approx(single["core"])


# ---- real data ---------------------------------------------------------------------------------------------


def test_real_task_list_and_file(data_dir):
    tasks = core.load_tasks(data_dir)
    assert len(tasks) == 22
    assert sorted(t["label"] for t in tasks if not t["present"]) == ["coqa", "jeopardy", "squad"]
    assert {t["icl_task_type"] for t in tasks} == set(core.TASK_TYPES)
    copa = next(t for t in tasks if t["label"] == "copa")
    items = core.load_items(data_dir, copa)
    assert len(items) == copa["records"]   # 100 in the full set: test_full_data
    assert all(len(it["choices"]) == 2 and it["gold"] in (0, 1) and it["query"] for it in items)
    wino = next(t for t in tasks if t["label"] == "winograd")
    assert all(len(it["context_options"]) == 2 and it["continuation"] for it in core.load_items(data_dir, wino))


def test_evaluate_core_tiny_gpt_on_real_tasks(data_dir, tok):
    model = tiny_gpt(tok.vocab_size, seq_len=128, init_seed=0).eval()
    labels = ["arc_easy", "winograd", "bigbench_operators"]  # 10-shot MC (cut to 128 tokens), schema, 10-shot LM
    out = core.evaluate_core(model, tok, data_dir, max_per_task=3, tasks=labels)
    tasks = {t["label"]: t for t in core.load_tasks(data_dir)}
    assert list(out["tasks"]) == labels
    for label, res in out["tasks"].items():
        assert res["items"] == 3 and res["accuracy"] in (0, 1 / 3, 2 / 3, 1)
        assert res["centered"] == pytest.approx(core.centered_accuracy(res["accuracy"],
                                                                       tasks[label]["random_baseline_pct"]))
    assert out["core"] == pytest.approx(sum(r["centered"] for r in out["tasks"].values()) / 3)
    assert "3 of 22 tasks" in out["note"]

    # the padded batch gives each candidate the mean loss the model's own loss path gives it alone
    items = core.load_items(data_dir, tasks["winograd"])
    texts = core.render_prompts(items[0], "schema", " ", [])
    seqs, spans = core.candidate_spans(tok.encode(texts, prepend=tok.bos_id), "schema", 128)
    _, means = core.score_candidates(model, seqs, spans, "schema", tok.bos_id)
    for s, (a, b), got in zip(seqs, spans, means):
        ids = torch.tensor([s])
        targets = torch.full_like(ids, -1)
        targets[0, a - 1:b - 1] = ids[0, a:b]
        with torch.no_grad():
            assert got == pytest.approx(model(ids[:, :-1], targets[:, :-1]).item(), rel=1e-5)


# ---- the driver: fastchat train eval ------------------------------------------------------------------------


def test_eval_driver_writes_and_merges_eval_json(tmp_path, data_dir, tok, tokenizer_file, monkeypatch, capsys):
    from fastchat_core import cli
    monkeypatch.setenv("FASTCHAT_DATA", data_dir)
    model = tiny_gpt(tok.vocab_size, seq_len=64, seed=None, init_seed=0, noise=0)
    run_dir = save_tiny_run(tmp_path / "home" / "base" / "d1", model, 5, tokenizer=tokenizer_file, loader_state={})
    # a small pretraining folder: the last file is the validation split
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    with gzip.open(Path(data_dir) / "pretrain" / "shard_005.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"][:2000] for line, _ in zip(f, range(40))]
    for name, part in (("a.jsonl", docs[:20]), ("b.jsonl", docs[20:])):
        (pretrain / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in part))

    common = ["--checkpoint", str(run_dir), "--device", "cpu", "--max-per-task", "2", "--data", str(pretrain)]
    # a base run with no evaluation named gets CORE and bits per byte
    assert cli.main(["train", "eval", *common, "--core-tasks", "copa,winograd", "--bpb-tokens", "256",
                     "--device-batch-size", "2"]) == 0
    first = json.loads((run_dir / "eval.json").read_text())
    assert set(first) == {"core", "bpb"}
    assert first["core"]["step"] == first["bpb"]["step"] == 5
    assert list(first["core"]["tasks"]) == ["copa", "winograd"]
    assert all(t["items"] == 2 for t in first["core"]["tasks"].values())
    assert 1.0 < first["bpb"]["val_bpb"] < 20 and first["bpb"]["tokens"] == 256  # random init: ~log2(V)/bytes

    # a second evaluation is merged in: the earlier entries stay
    assert cli.main(["train", "eval", *common, "--chat", "--chat-tasks", "arc_easy"]) == 0
    merged = json.loads((run_dir / "eval.json").read_text())
    assert merged["core"] == first["core"] and merged["bpb"] == first["bpb"]
    chat = merged["chatcore"]
    assert chat["step"] == 5 and 0 <= chat["arc_easy"] <= 1 and -1 < chat["chatcore"] <= 1

    capsys.readouterr()
    assert cli.main(["train", "eval", *common, "--core", "--core-tasks", "squad"]) == 1
    assert "fastchat train eval: error: CORE tasks ['squad'] are unknown or have no data" in capsys.readouterr().err


# ---- the draw of items and few-shot examples is nanochat's ---------------------------------------------------


def nanochat_draw(items, max_per_task, k):
    """nanochat's rule, re-implemented from its description (scripts/base_eval.py, nanochat/core_eval.py): the task's
    list shuffled with random.Random(1337), cut to max_per_task (-1: all); the item at position idx of that list
    gets random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], k) of it as examples."""
    import random
    data = list(items)
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    draws = []
    for idx in range(len(data)):
        available = [i for i in range(len(data)) if i != idx]
        draws.append((data[idx]["id"], [data[i]["id"] for i in random.Random(1234 + idx).sample(available, k)]))
    return draws


@pytest.mark.parametrize("n,max_per_task,k", [(40, -1, 5), (40, 12, 3), (7, -1, 6), (100, 30, 10)])
def test_draw_equals_nanochats(n, max_per_task, k):
    items = [{"id": i} for i in range(n)]
    data = core.evaluation_order(items, None if max_per_task < 0 else max_per_task)
    ours = [(it["id"], [s["id"] for s in core.fewshot_examples(data, i, k)]) for i, it in enumerate(data)]
    assert ours == nanochat_draw(items, max_per_task, k)
    assert ours == [(it["id"], [s["id"] for s in core.fewshot_examples(core.evaluation_order(
        items, None if max_per_task < 0 else max_per_task), i, k)]) for i, it in enumerate(data)]   # deterministic
    assert [it["id"] for it in items] == list(range(n))   # the caller's list is not shuffled in place


def test_evaluate_core_scores_in_nanochats_order(tmp_path, monkeypatch):
    """evaluate_core hands each item its position in nanochat's shuffled list, and the few-shot examples follow."""
    root = tmp_path / "data"
    (root / "core").mkdir(parents=True)
    items = [{"id": i, "context": f"c{i}", "continuation": f"x{i}"} for i in range(15)]
    with gzip.open(root / "core" / "t.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(it) + "\n" for it in items)
    (root / "core" / "core_tasks.json").write_text(json.dumps({"tasks": [
        {"label": "t", "file": "core/t.jsonl.gz", "present": True, "icl_task_type": "language_modeling",
         "num_fewshot": 3, "continuation_delimiter": " ", "random_baseline_pct": 0.0}]}))
    seen = []

    def fake_item(model, tokenizer, data, index, task, max_seq_len=None, device=None):
        seen.append((data[index]["id"], [s["id"] for s in core.fewshot_examples(data, index, task["num_fewshot"])]))
        return True

    monkeypatch.setattr(core, "evaluate_item", fake_item)
    for max_per_task in (None, 6):
        seen.clear()
        core.evaluate_core(BigramModel(), CharTokenizer(), root, max_per_task=max_per_task)
        assert seen == nanochat_draw(items, max_per_task or -1, 3)

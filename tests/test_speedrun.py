"""The speedrun orchestration: stage order, arguments that chain the stages, resume markers, offline fallback.
(The stages themselves are tested in their own files; the whole tiny pipeline is the README's main job.)"""
import itertools

import pytest

from fastchat_core.data import iter_texts
from fastchat_core.train import speedrun


def record_calls(monkeypatch, fail_at=None):
    calls = []

    def call(cmd, env=None):
        module = next(a for a in cmd if a.startswith("fastchat_core."))
        calls.append((module, cmd))
        return 1 if module == fail_at else 0
    monkeypatch.setattr(speedrun.subprocess, "call", call)
    return calls


def test_stages_run_in_order_and_resume(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    calls = record_calls(monkeypatch, fail_at="fastchat_core.train.rl")
    with pytest.raises(SystemExit, match="stage rl failed"):
        speedrun.main(["--preset", "tiny"])
    modules = [m for m, _ in calls]
    assert modules == ["fastchat_core.train.tokenizer", "fastchat_core.train.base", "fastchat_core.train.mid",
                       "fastchat_core.train.sft", "fastchat_core.train.rl"]
    # each stage starts from the previous stage's run folder
    args = {m: " ".join(c) for m, c in calls}
    assert f"--init-from={tmp_path}/base/d2" in args["fastchat_core.train.mid"]
    assert f"--init-from={tmp_path}/mid/d2" in args["fastchat_core.train.sft"]
    assert f"--tokenizer={tmp_path}/tokenizer/tokenizer.json" in args["fastchat_core.train.base"]
    # run again: finished stages are skipped, the failed one and the rest run
    calls = record_calls(monkeypatch)
    assert speedrun.main(["--preset", "tiny"]) == 0
    assert [m for m, _ in calls] == ["fastchat_core.train.rl", "fastchat_core.train.eval",
                                                 "fastchat_core.train.eval", "fastchat_core.report",
                                                 "fastchat_core.chat_cli"]


def test_multi_gpu_presets_launch_torchrun(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    calls = record_calls(monkeypatch)
    speedrun.main(["--preset", "d12"])
    base = dict(calls)["fastchat_core.train.base"]
    assert "torch.distributed.run" in base and "--nproc_per_node=8" in base
    tok = dict(calls)["fastchat_core.train.tokenizer"]
    assert "torch.distributed.run" not in tok  # single-process stages stay single-process


def test_offline_fallback_corpus_is_readable_text(tmp_path, monkeypatch):
    corpus = speedrun.fallback_corpus(tmp_path / "corpus")
    docs = list(itertools.islice(iter_texts(corpus), 50))
    assert len(docs) == 50 and all(d.strip() for d in docs) and sum(map(len, docs)) > 50 * 200
    assert any("def " in d for d in docs)  # Python sources
    monkeypatch.delenv("FASTCHAT_DATA", raising=False)
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="FASTCHAT_DATA"):
        speedrun.main(["--preset", "d20"])  # only the tiny preset falls back


@pytest.mark.parametrize("preset", sorted(speedrun.PRESETS))
def test_every_stage_accepts_its_preset_arguments(tmp_path, monkeypatch, data_dir, preset):
    """A typo in a preset would only show on the GPU, stages deep into a run: parse each stage's
    arguments with its own driver's parser here."""
    from fastchat_core.train import base, eval as evaluate, rl, sft
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    calls = record_calls(monkeypatch)
    speedrun.main(["--preset", preset])
    parsers = {"fastchat_core.train.base": base.get_args, "fastchat_core.train.sft": sft.get_args,
               "fastchat_core.train.mid": lambda argv: sft.get_args(argv, "mid"),
               "fastchat_core.train.rl": rl.get_args, "fastchat_core.train.eval": evaluate.get_args}
    checked = 0
    for module, cmd in calls:
        if module in parsers:
            parsers[module](cmd[cmd.index(module) + 1:])
            checked += 1
    assert checked == 6   # base, mid, sft, rl and two evals

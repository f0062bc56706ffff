"""The pretraining driver: learning on real text, multi-process equivalence, exact resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastchat_core.common import ConfigError, DataError
from fastchat_core.train import base

TINY = ["--depth=1", "--seq-len=64", "--device-batch-size=4", "--eval-every=0", "--threads=1"]


def run_driver(args, env_extra=None, nproc=1, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastchat_core.train.base", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastchat_core.train.base", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def losses(run_dir):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def final_params(run_dir):
    latest = (Path(run_dir) / "latest").read_text().strip()
    return torch.load(Path(run_dir) / latest / "model.pt", weights_only=True)


def test_loss_falls_on_real_text(tmp_path, tokenizer_file, data_dir):
    summary = base.main(TINY + [f"--tokenizer={tokenizer_file}", f"--data={data_dir}/pretrain",
                                "--total-batch-size=512", "--num-iterations=60", "--embedding-lr=0.05",
                                "--eval-every=30", "--eval-tokens=2048", f"--run-dir={tmp_path}", "--device=cpu"])
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_bpb"] for r in recs if "val_bpb" in r}
    # the same held-out batches before and after training: bits per byte must drop clearly
    assert val[60] == summary["val_bpb"]   # the final evaluation, logged at the last step
    assert val[0] - val[60] > 0.5, val
    curve = losses(tmp_path)
    assert sum(curve[s] for s in range(51, 61)) / 10 < curve[1] - 1.0


def test_bad_batch_flags_give_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a multiple"):
        base.main(TINY + ["--random-data", "--vocab-size=64", "--total-batch-size=300", f"--run-dir={tmp_path}"])


def test_missing_data_gives_clear_error(tmp_path, tokenizer_file):
    with pytest.raises(DataError, match="no pretraining data"):
        base.main(TINY + [f"--tokenizer={tokenizer_file}", f"--data={tmp_path}/nope", f"--run-dir={tmp_path}"])


def test_two_processes_equal_one_process(tmp_path):
    """gloo DP with the optimizer's in-step reduction == one process with the same total batch."""
    common = TINY + ["--random-data", "--vocab-size=128", "--total-batch-size=512", "--num-iterations=4",
                     "--device=cpu"]
    p1 = run_driver(common + [f"--run-dir={tmp_path}/one"])
    p2 = run_driver(common + [f"--run-dir={tmp_path}/two"], nproc=2)
    out1, _ = p1.communicate(timeout=300)
    out2, _ = p2.communicate(timeout=300)
    assert p1.returncode == 0, out1
    assert p2.returncode == 0, out2
    assert "x 2 accum" in out1 and "x 2 ranks x 1 accum" in out2  # same total batch, split differently
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-4, atol=2e-5, msg=k)
    # and training really moved them: compare with the initialization both runs started from
    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    init = GPT(ModelConfig(depth=1, vocab_size=128, seq_len=64)).init_weights(42).state_dict()
    for k in ("wte.weight", "lm_head.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.c_proj.weight"):
        assert (a[k] - init[k]).abs().max() > 1e-3, k
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-4, (s, la[s], lb[s])


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path):
    common = TINY + ["--random-data", "--vocab-size=128", "--total-batch-size=256", "--num-iterations=120",
                     "--device=cpu"]
    ref = run_driver(common + [f"--run-dir={tmp_path}/ref"])
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    run = tmp_path / "killed"
    p = run_driver(common + [f"--run-dir={run}", "--save-every=10"])
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once a checkpoint exists and training has gone past it
        if (run / "latest").exists() and max(losses(run), default=0) >= 25:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise --num-iterations"
    resumed_from = int((run / "latest").read_text().strip().split("_")[1])
    assert resumed_from < 120

    r = run_driver(common + [f"--run-dir={run}", "--save-every=10", "--resume"])
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0, out
    assert f"resumed from" in out
    want = losses(tmp_path / "ref")
    # metrics.jsonl holds the killed run's lines and then the resumed run's: the last value per step wins
    got = losses(run)
    for s in range(resumed_from + 1, 121):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), s
    ref_params, got_params = final_params(tmp_path / "ref"), final_params(run)
    for k in ref_params:
        torch.testing.assert_close(got_params[k], ref_params[k], rtol=1e-6, atol=1e-7)

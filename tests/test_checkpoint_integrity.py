"""Checkpoint integrity: every file's SHA-256 in a manifest, damaged steps skipped on --resume for the newest intact
one, a missing data position refused unless --accept-data-restart, and checkpoints from before checksums."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastchat_core.checkpoint import (CheckpointError, CorruptCheckpointError, latest_checkpoint, load_model,
                                      resume_checkpoint)
from fastchat_core import cli
from fastchat_core.config import ModelConfig
from fastchat_core.model import GPT
from fastchat_core.optim import build_optimizers
from fastchat_core.train import base
from test_train import losses, run_driver

# 15 steps, saved at 5, 10 and 15; the last two are kept
RUN = ["--depth=1", "--seq-len=64", "--device-batch-size=4", "--eval-every=0", "--threads=1", "--random-data",
       "--vocab-size=128", "--total-batch-size=256", "--num-iterations=15", "--save-every=5", "--device=cpu",
       "--log-every=100"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished run with intact steps 10 and 15, kept as the original that each test copies and damages."""
    run = tmp_path_factory.mktemp("run")
    base.main(RUN + [f"--run-dir={run}"])
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000010", "step_000015"]
    return run


@pytest.fixture()
def run(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "run"))


def flip(path, at=0.5):
    """Invert one byte in the middle of the file (in a .pt file, inside a tensor: torch.load does not notice)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def fresh_model():
    model = GPT(ModelConfig(depth=1, vocab_size=128, seq_len=64)).init_weights(0)
    return model, build_optimizers(model)


def assert_holds(ckpt, model, optimizers):
    """model and optimizers hold exactly what the (intact) checkpoint folder saved."""
    saved_model = torch.load(ckpt / "model.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved_model[k]), k
    saved_optim = torch.load(ckpt / "optim_rank0.pt", weights_only=False)
    torch.testing.assert_close([opt.state_dict() for opt in optimizers], saved_optim, rtol=0, atol=0)


def test_manifest_lists_every_file_with_its_checksum(saved):
    for ckpt in saved.glob("step_*"):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
        assert set(manifest["files"]) == files == {"model.pt", "meta.json", "optim_rank0.pt", "loader_rank0.json",
                                                   "rng_rank0.pt"}
        for name, entry in manifest["files"].items():
            body = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}, name
        assert json.loads((ckpt / "meta.json").read_text())["format"] == manifest["format"] == 2
    assert not list(saved.rglob("*.part")) and not list(saved.glob("*.tmp"))


@pytest.mark.parametrize("damage", [
    ("model.pt", flip), ("optim_rank0.pt", flip), ("meta.json", flip), ("loader_rank0.json", flip),
    ("rng_rank0.pt", flip), ("model.pt", truncate), ("optim_rank0.pt", truncate), ("model.pt", Path.unlink), ("optim_rank0.pt", Path.unlink),
    ("manifest.json", Path.unlink), ("manifest.json", truncate),
], ids=lambda d: f"{d[0]}-{d[1].__name__}")
def test_damaged_step_is_skipped_for_the_previous_intact_one(run, damage):
    name, how = damage
    how(run / "step_000015" / name)
    model, optimizers = fresh_model()
    with pytest.warns(UserWarning, match=f"skipping step_000015: .*{name}") as warned:
        ckpt, meta, loader_state = resume_checkpoint(run, model, optimizers)
    assert len(warned) == 1
    assert ckpt == run / "step_000010" and meta["step"] == 10 and loader_state == {"i": 10}
    assert_holds(ckpt, model, optimizers)


@pytest.mark.parametrize("name", ["model.pt", "optim_rank0.pt"])
def test_resume_after_damage_continues_exactly_from_the_intact_step(saved, run, name, capsys):
    """The driver resumes from step 10 and its steps 11..15 equal the undamaged run's: weights, optimizer and data
    position all came back from step 10."""
    reference = torch.load(saved / "step_000015" / "model.pt", weights_only=True)
    want = losses(saved)
    flip(run / "step_000015" / name)
    torch.load(run / "step_000015" / name, weights_only=name == "model.pt")  # the flip alone goes unnoticed
    with pytest.warns(UserWarning, match=f"skipping step_000015: .*{name} does not match its SHA-256"):
        base.main(RUN + [f"--run-dir={run}", "--resume"])
    assert f"resumed from {run / 'step_000010'} at step 10" in capsys.readouterr().out
    got = losses(run)  # the copied lines of the first run, then the resumed run's: the last value per step wins
    for s in range(11, 16):
        assert got[s] == want[s], s
    final = torch.load(run / "step_000015" / "model.pt", weights_only=True)
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


def test_latest_pointer_to_a_deleted_or_stale_step(run):
    shutil.rmtree(run / "step_000015")  # `latest` still names it
    assert latest_checkpoint(run) == run / "step_000010"
    assert load_model(run)[1]["step"] == 10
    model, optimizers = fresh_model()
    assert resume_checkpoint(run, model, optimizers)[0] == run / "step_000010"
    assert_holds(run / "step_000010", model, optimizers)

    (run / "latest").unlink()
    assert latest_checkpoint(run) == run / "step_000010"


def test_resume_scans_the_step_folders_not_the_pointer(run):
    (run / "latest").write_text("step_000010")  # e.g. killed between renaming step 15 and updating the pointer
    model, optimizers = fresh_model()
    ckpt, meta, _ = resume_checkpoint(run, model, optimizers)
    assert ckpt == run / "step_000015" and meta["step"] == 15
    assert_holds(ckpt, model, optimizers)


def test_no_intact_checkpoint_is_a_clear_error(run, tmp_path):
    flip(run / "step_000015" / "model.pt")
    truncate(run / "step_000010" / "optim_rank0.pt")
    model, optimizers = fresh_model()
    with pytest.warns(UserWarning) as warned, pytest.raises(CorruptCheckpointError, match="no intact checkpoint"):
        resume_checkpoint(run, model, optimizers)
    assert [str(w.message).split(":")[0] for w in warned] == ["skipping step_000015", "skipping step_000010"]
    with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError,
                                                  match="--resume: no intact checkpoint.*without --resume"):
        base.main(RUN + [f"--run-dir={run}", "--resume"])
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in"):
        base.main(RUN + [f"--run-dir={tmp_path / 'empty'}", "--resume"])


def test_load_model_names_the_damaged_file(run):
    flip(run / "step_000015" / "model.pt")
    with pytest.raises(CorruptCheckpointError, match=f"{run / 'step_000015' / 'model.pt'} does not match its "
                                                     "SHA-256.*use an earlier step"):
        load_model(run)
    assert load_model(run / "step_000010")[1]["step"] == 10
    (run / "step_000015" / "model.pt").unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{run / 'step_000015' / 'model.pt'} is missing"):
        load_model(run / "step_000015")


def test_world_size_mismatch_is_an_error_not_damage(run):
    ckpt = run / "step_000015"
    body = json.dumps(dict(json.loads((ckpt / "meta.json").read_text()), world_size=2)).encode()
    (ckpt / "meta.json").write_bytes(body)
    manifest = json.loads((ckpt / "manifest.json").read_text())  # saved so: not damage
    manifest["files"]["meta.json"] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    model, optimizers = fresh_model()
    with pytest.raises(CheckpointError, match="written by 2 ranks.*same --nproc_per_node") as e:
        resume_checkpoint(run, model, optimizers)
    assert not isinstance(e.value, CorruptCheckpointError)  # not skipped: an older step would not fit either


def test_missing_loader_state_refuses_unless_accepted(run):
    (run / "step_000015" / "loader_rank0.json").unlink()
    lines = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"holds no data loader position.*pass --accept-data-restart"):
        base.main(RUN + [f"--run-dir={run}", "--resume", "--num-iterations=20"])
    assert (run / "metrics.jsonl").read_text() == lines  # refused before training a step

    base.main(RUN + [f"--run-dir={run}", "--resume", "--num-iterations=20", "--accept-data-restart"])
    # the data restarted: 5 batches since the resume, not 20
    assert json.loads((run / "step_000020" / "loader_rank0.json").read_text()) == {"i": 5}
    assert max(losses(run)) == 20


def test_checkpoint_saved_before_checksums_loads_unverified(run):
    for ckpt in run.glob("step_*"):  # what the code before manifests wrote
        (ckpt / "manifest.json").unlink()
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta["format"]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    model, optimizers = fresh_model()
    with pytest.warns(UserWarning, match="step_000015 was saved before checkpoints had checksums.*unverified"):
        ckpt, meta, loader_state = resume_checkpoint(run, model, optimizers)
    assert ckpt == run / "step_000015" and loader_state == {"i": 15}
    assert_holds(ckpt, model, optimizers)
    # unverified, a damaged file still shows when it fails to load, and the step is skipped
    truncate(run / "step_000015" / "model.pt")
    with pytest.warns(UserWarning) as warned:
        assert resume_checkpoint(run, model, optimizers)[0] == run / "step_000010"
    assert_holds(run / "step_000010", model, optimizers)
    assert {str(w.message).split(":")[0] for w in warned} == {
        f"{run / 'step_000015'} was saved before checkpoints had checksums", "skipping step_000015",
        f"{run / 'step_000010'} was saved before checkpoints had checksums"}
    assert any("model.pt cannot be read" in str(w.message) for w in warned)


def test_two_ranks_agree_to_skip_a_step_one_of_them_finds_damaged(tmp_path):
    """Only rank 1's optimizer shard of step 15 is damaged: both ranks must resume from step 10, together."""
    common = [a for a in RUN if a != "--total-batch-size=256"] + ["--total-batch-size=512", f"--run-dir={tmp_path}"]
    p = run_driver(common, nproc=2)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    want = losses(tmp_path)
    flip(tmp_path / "step_000015" / "optim_rank1.pt")
    p = run_driver(common + ["--resume"], nproc=2)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "skipping step_000015: another rank found one of its files damaged" in out
    assert f"{tmp_path / 'step_000015' / 'optim_rank1.pt'} does not match its SHA-256" in out
    assert f"resumed from {tmp_path / 'step_000010'} at step 10" in out
    got = losses(tmp_path)
    for s in range(11, 16):
        assert got[s] == want[s], s


def test_fastchat_commands_report_a_damaged_checkpoint_without_a_traceback(run, capsys):
    flip(run / "step_000015" / "model.pt")
    assert cli.main(["chat", "--checkpoint", str(run / "step_000015"), "-p", "hi"]) == 1
    err = capsys.readouterr().err
    assert "fastchat chat: error:" in err and "model.pt does not match its SHA-256" in err
    assert "Traceback" not in err

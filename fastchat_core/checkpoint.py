"""Atomic, checksummed checkpoints with per-rank optimizer and loader shards, and exact resume.

Layout:  <run_dir>/step_000100/{model.pt, meta.json, optim_rank{r}.pt, loader_rank{r}.json, rng_rank{r}.pt,
                                 manifest.json}
Every rank writes its shards into step_XXXXXX.tmp/, hashing them (SHA-256) as they are written; after a barrier rank
0 writes manifest.json (every file's size and hash) last, fsyncs and renames the folder, then rewrites
<run_dir>/latest. A crash mid-save leaves only a .tmp folder, never a half checkpoint.

Every load checks its file against the manifest, so a file damaged later (a bad disk, a truncated copy) raises
CorruptCheckpointError naming it instead of loading wrong weights; resume_checkpoint skips such a step for the
newest intact one. Checkpoints saved before manifests existed still load, with a warning that they are unverified.
Resuming (optimizers given) also restores each rank's torch random number generators, so that anything drawn from
them continues exactly as it would have without the interruption.
"""
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from fastchat_core.common import UserError, home_dir, is_dist, rank, world_size

MANIFEST = "manifest.json"
FORMAT = 2  # meta["format"]: the files are listed with their SHA-256 in MANIFEST (absent: saved before checksums)


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or not what was saved (its SHA-256 differs)."""


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A write-only file that hashes the bytes passing through it, so a checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += memoryview(data).nbytes
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _write_atomic(path: Path, write) -> dict:
    """write(file) into path, through a .part file renamed when complete; returns its size and SHA-256."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        hashing = _Hashing(f)
        write(hashing)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": hashing.size, "sha256": hashing.sha.hexdigest()}


def save_checkpoint(run_dir, step, model, optimizers, loader_state, meta, keep_last: int = 2):
    """Collective under torchrun: every rank calls it. Returns the checkpoint folder."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f"step_{step:06d}.tmp"
    r = rank()
    if r == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if is_dist():
        dist.barrier()
    files = {}
    if r == 0:
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
        files["model.pt"] = _write_atomic(tmp / "model.pt", lambda f: torch.save(state, f))
        meta = dict(meta, step=step, world_size=world_size(), format=FORMAT)
        files["meta.json"] = _write_atomic(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    optim_state = [opt.state_dict() for opt in optimizers]
    files[f"optim_rank{r}.pt"] = _write_atomic(tmp / f"optim_rank{r}.pt", lambda f: torch.save(optim_state, f))
    files[f"loader_rank{r}.json"] = _write_atomic(tmp / f"loader_rank{r}.json",
                                                  lambda f: f.write(json.dumps(loader_state).encode()))
    files[f"rng_rank{r}.pt"] = _write_atomic(tmp / f"rng_rank{r}.pt", lambda f: torch.save(_rng_state(), f))
    if is_dist():  # also the barrier: a rank contributes once its shards are written
        parts = [None] * world_size()
        dist.all_gather_object(parts, files)
        files = {name: entry for part in parts for name, entry in part.items()}
    if r == 0:
        manifest = {"format": FORMAT, "files": files}
        _write_atomic(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(run_dir / "latest", lambda f: f.write(final.name.encode()))
        _fsync_dir(run_dir)
        for p in _steps(run_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(p, ignore_errors=True)
    if is_dist():
        dist.barrier()
    return final


def _steps(run_dir: Path) -> list[Path]:
    """The step folders of a run, oldest first (unfinished .tmp folders are not steps)."""
    found = [p for p in run_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir) -> Path | None:
    """The step folder `latest` names or, when that is gone (e.g. deleted as damaged), the newest one left."""
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if marker.exists():
        path = run_dir / marker.read_text().strip()
        if path.is_dir():
            return path
    steps = _steps(run_dir)
    return steps[-1] if steps else None


def newest_checkpoint(stages) -> Path | None:
    """The newest checkpoint (by its folder's modification time) of the runs $FASTCHAT_HOME/<stage>/<run>,
    trying the stages in order and answering from the first that has one; None when none has."""
    home = home_dir()
    for stage in stages:
        found = [c for run in (home / stage).glob("*") if (c := latest_checkpoint(run)) is not None]
        if found:
            return max(found, key=lambda c: c.stat().st_mtime)
    return None


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _damaged(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path} {why}: checkpoint {path.parent} is damaged; use an earlier step "
                                  "(--resume falls back to one by itself; elsewhere pass its step folder)")


def _manifest(ckpt_dir: Path) -> dict | None:
    """{file name: {bytes, sha256}} as saved; None, with a warning, for a checkpoint saved before checksums."""
    path = ckpt_dir / MANIFEST
    if not path.exists():
        meta_file = ckpt_dir / "meta.json"
        try:
            saved_format = _read_json(meta_file).get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise _damaged(meta_file, f"cannot be read ({e})") from None
        if saved_format is not None:  # saved with a manifest, so the folder has lost it
            raise _damaged(path, "is missing")
        # warnings shows a message once per place, so the several files of one load warn once
        warnings.warn(f"{ckpt_dir} was saved before checkpoints had checksums: its files are loaded unverified")
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(path, f"cannot be read ({e!r})") from None


def _load_file(path: Path, load):
    """load(path) once the file's size and SHA-256 match the manifest; CorruptCheckpointError naming it if not."""
    files = _manifest(path.parent)
    if not path.exists():
        raise _damaged(path, "is missing")
    if files is None:  # unverified: a damaged file shows only when it fails to load
        try:
            return load(path)
        except Exception as e:
            raise _damaged(path, f"cannot be read ({e})") from e
    saved = files.get(path.name)
    if saved is None:
        raise _damaged(path, f"is not listed in {MANIFEST}")
    size = path.stat().st_size
    if size != saved["bytes"]:
        raise _damaged(path, f"has {size} bytes, {saved['bytes']} were saved (truncated or overwritten)")
    if _sha256(path) != saved["sha256"]:
        raise _damaged(path, "does not match its SHA-256 checksum (the bytes changed after saving)")
    return load(path)


def _read_json(path: Path):
    return json.loads(path.read_text())


def load_meta(ckpt_dir) -> dict:
    return _load_file(Path(ckpt_dir) / "meta.json", _read_json)


def load_model_state(ckpt_dir, device="cpu") -> dict:
    return _load_file(Path(ckpt_dir) / "model.pt", lambda p: torch.load(p, map_location=device, weights_only=True))


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_checkpoint(ckpt_dir, model, optimizers=None, device="cpu"):
    """Restore model (and, given optimizers, this rank's optimizer shards and random number generators); returns
    (meta, loader_state), loader_state None when the checkpoint holds no data position for this rank."""
    ckpt_dir = Path(ckpt_dir)
    meta = load_meta(ckpt_dir)
    _unwrap(model).load_state_dict(load_model_state(ckpt_dir, device))
    r = rank()
    if optimizers is not None:
        ws = world_size()
        if meta.get("world_size", 1) != ws:
            raise CheckpointError(f"checkpoint {ckpt_dir} was written by {meta.get('world_size')} ranks; "
                                  f"resume it with the same --nproc_per_node (now {ws})")
        states = _load_file(ckpt_dir / f"optim_rank{r}.pt",
                            lambda p: torch.load(p, map_location=device, weights_only=False))
        for opt, st in zip(optimizers, states):
            opt.load_state_dict(st)
        rng_file = ckpt_dir / f"rng_rank{r}.pt"
        if rng_file.exists():  # saved since checkpoints hold it; older ones continue with the generators as seeded
            _set_rng_state(_load_file(rng_file, lambda p: torch.load(p, weights_only=True)))
    loader_file = ckpt_dir / f"loader_rank{r}.json"
    # a missing loader state is not damage to the weights: the caller decides whether restarting the data will do
    loader_state = _load_file(loader_file, _read_json) if loader_file.exists() else None
    return meta, loader_state


def resume_checkpoint(run_dir, model, optimizers, device="cpu"):
    """Restore the newest intact checkpoint of a run folder (--resume); returns (folder, meta, loader_state).

    Every step folder is a candidate, newest first, whatever `latest` says: one with a missing, truncated or
    corrupt file is skipped with a warning that names it. Collective under torchrun: each rank checks the files it
    loads and all take the newest step that every rank could load. loader_state is None when any rank has none.
    """
    run_dir = Path(run_dir)
    steps = _steps(run_dir)
    if not steps:
        raise CheckpointError(f"no checkpoint in {run_dir}: start without --resume, or pass the run's --run-dir")
    for ckpt in reversed(steps):
        try:
            meta, loader_state = load_checkpoint(ckpt, model, optimizers, device)
            problem = None
        except CorruptCheckpointError as e:
            problem = str(e)
        if _on_every_rank(problem is None, device):
            return ckpt, meta, (loader_state if _on_every_rank(loader_state is not None, device) else None)
        warnings.warn(f"skipping {ckpt.name}: {problem or 'another rank found one of its files damaged'}")
    raise CorruptCheckpointError(f"no intact checkpoint in {run_dir} (the warnings above say what is wrong with "
                                 f"each of {', '.join(p.name for p in steps)}): restore one, or start without --resume")


def _on_every_rank(ok: bool, device) -> bool:
    if not is_dist():
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint); a clear error otherwise."""
    path = Path(path)
    if (path / "meta.json").exists():  # a step folder, even one that lost its model.pt (loading names it)
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path}: train one first (e.g. `fastchat train base`) or pass its "
                              "folder")
    return latest


def load_model(path, device="cpu", dtype=None):
    """Rebuild the GPT a checkpoint (or run folder) holds; returns (model, meta). For inference pass
    dtype=torch.bfloat16 on GPU."""
    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    ckpt = resolve_checkpoint(path)
    meta = load_meta(ckpt)
    with torch.device("meta"):
        model = GPT(ModelConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the rotary buffers; the weights are overwritten next
    model.load_state_dict(load_model_state(ckpt, device))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), meta

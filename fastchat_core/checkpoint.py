"""Atomic checkpoints with per-rank optimizer and loader shards, and exact resume.

Layout:  <run_dir>/step_000100/{model.pt, meta.json, optim_rank{r}.pt, loader_rank{r}.json}
Every rank writes its shards into step_XXXXXX.tmp/; after a barrier rank 0 fsyncs and renames the folder,
then rewrites <run_dir>/latest. A crash mid-save leaves only a .tmp folder, never a half checkpoint.
"""
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from fastchat_core.common import home_dir, is_dist, rank, world_size


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write):
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    if r == 0:
        state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
        _write_atomic(tmp / "model.pt", lambda f: torch.save(state, f))
        meta = dict(meta, step=step, world_size=world_size())
        _write_atomic(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    optim_state = [opt.state_dict() for opt in optimizers]
    _write_atomic(tmp / f"optim_rank{r}.pt", lambda f: torch.save(optim_state, f))
    _write_atomic(tmp / f"loader_rank{r}.json", lambda f: f.write(json.dumps(loader_state).encode()))
    if is_dist():
        dist.barrier()
    if r == 0:
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(run_dir / "latest", lambda f: f.write(final.name.encode()))
        _fsync_dir(run_dir)
        old = sorted(p for p in run_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in old[:-keep_last] if keep_last else []:
            shutil.rmtree(p, ignore_errors=True)
    if is_dist():
        dist.barrier()
    return final


def latest_checkpoint(run_dir) -> Path | None:
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if not marker.exists():
        return None
    path = run_dir / marker.read_text().strip()
    return path if path.is_dir() else None


def newest_checkpoint(stages) -> Path | None:
    """The newest checkpoint (by its folder's modification time) of the runs $FASTCHAT_HOME/<stage>/<run>,
    trying the stages in order and answering from the first that has one; None when none has."""
    home = home_dir()
    for stage in stages:
        found = [c for run in (home / stage).glob("*") if (c := latest_checkpoint(run)) is not None]
        if found:
            return max(found, key=lambda c: c.stat().st_mtime)
    return None


def load_meta(ckpt_dir) -> dict:
    return json.loads((Path(ckpt_dir) / "meta.json").read_text())


def load_model_state(ckpt_dir, device="cpu") -> dict:
    return torch.load(Path(ckpt_dir) / "model.pt", map_location=device, weights_only=True)


def load_checkpoint(ckpt_dir, model, optimizers=None, device="cpu"):
    """Restore model (and this rank's optimizer shards); returns (meta, loader_state)."""
    ckpt_dir = Path(ckpt_dir)
    meta = load_meta(ckpt_dir)
    _unwrap(model).load_state_dict(load_model_state(ckpt_dir, device))
    r = rank()
    if optimizers is not None:
        ws = world_size()
        if meta.get("world_size", 1) != ws:
            raise SystemExit(f"checkpoint {ckpt_dir} was written by {meta.get('world_size')} ranks; "
                             f"resume it with the same --nproc_per_node (now {ws})")
        states = torch.load(ckpt_dir / f"optim_rank{r}.pt", map_location=device, weights_only=False)
        for opt, st in zip(optimizers, states):
            opt.load_state_dict(st)
    loader_file = ckpt_dir / f"loader_rank{r}.json"
    loader_state = json.loads(loader_file.read_text()) if loader_file.exists() else None
    return meta, loader_state


def _unwrap(model):
    return getattr(model, "_orig_mod", model)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint); a clear error otherwise."""
    path = Path(path)
    if (path / "model.pt").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise SystemExit(f"no checkpoint at {path}: train one first (e.g. `fastchat train base`) or pass its folder")
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

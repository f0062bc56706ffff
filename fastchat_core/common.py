"""Small shared helpers: the errors a user can fix, where files live, distributed set-up, printing from rank 0."""
import os
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """An error the user can fix (a flag, a path, a damaged file); the message says what to do. Library code
    raises it and never exits; entry points (fastchat_core.cli.run) print it without a traceback and exit 1."""


class ConfigError(UserError):
    """Flags or environment that cannot work as given; the message names the flag or variable to change."""


class DataError(UserError, ValueError):
    """A data file that is missing or cannot be read as its name says; the message names the file, where in it,
    and the fix."""


def home_dir() -> Path:
    """Root for tokenizers, checkpoints and reports ($FASTCHAT_HOME, default ~/.cache/fastchat)."""
    path = Path(os.environ.get("FASTCHAT_HOME", Path.home() / ".cache" / "fastchat"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root() -> Path | None:
    """Local data root named by $FASTCHAT_DATA, or None when unset."""
    root = os.environ.get("FASTCHAT_DATA")
    return Path(root) if root else None


def require_data(*parts: str) -> Path:
    """A path under $FASTCHAT_DATA that must exist; a clear error naming the fix otherwise."""
    root = data_root()
    if root is None:
        raise ConfigError("FASTCHAT_DATA is not set: point it at a data folder (e.g. export FASTCHAT_DATA=../shared/data)")
    path = root.joinpath(*parts)
    if not path.exists():
        raise DataError(f"missing data: {path} does not exist (check FASTCHAT_DATA={root})")
    return path


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def init_dist(device_type: str | None = None):
    """Initialise torch.distributed when launched by torchrun; returns (rank, local_rank, world, device).

    NCCL on CUDA, gloo on CPU. Without torchrun this is a plain single process.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return dist.get_rank(), local_rank, dist.get_world_size(), device
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
    return 0, 0, 1, device


def cleanup_dist():
    if is_dist():
        dist.destroy_process_group()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """Which code this is: $FASTCHAT_COMMIT when set (a copy of the working tree, as the GPU machine gets,
    may carry a stale .git or none), else `git rev-parse` of this package's checkout."""
    if os.environ.get("FASTCHAT_COMMIT"):
        return os.environ["FASTCHAT_COMMIT"]
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

"""Small shared helpers: where files live, distributed set-up, the training drivers' start-up, logging from
rank 0."""
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist


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
        raise SystemExit("FASTCHAT_DATA is not set: point it at a data folder (e.g. export FASTCHAT_DATA=../shared/data)")
    path = root.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"missing data: {path} does not exist (check FASTCHAT_DATA={root})")
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


# ---- what the drivers (train/base, sft, mid, rl, eval) share ----------------------------------------------

def add_run_args(group, run_dir_help: str | None = None):
    """The drivers' common flags on an argparse parser or group: --run-dir (when run_dir_help is given),
    --device and --threads."""
    if run_dir_help is not None:
        group.add_argument("--run-dir", default=None, help=run_dir_help)
    group.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    group.add_argument("--threads", type=int, default=0, help="CPU threads per process (0 = torch default)")


class Run(NamedTuple):
    """Where a driver runs: its rank, local rank and world size, and its device (see setup_run)."""
    rank: int
    local_rank: int
    world: int
    device: torch.device

    def autocast(self):
        """bf16 autocast on CUDA, nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


def setup_run(args, seed: int | None = None, tf32: bool = True) -> Run:
    """A driver's start-up from its add_run_args flags: CPU threads (--threads), the device (--device; a clear
    error when CUDA is asked for and absent), torch.distributed under torchrun (init_dist), then torch's seed
    (when given) and TF32 matmuls on CUDA (when tf32)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but no CUDA GPU is visible; use --device cpu")
    run = Run(*init_dist(device_type))
    if seed is not None:
        torch.manual_seed(seed)
    if tf32 and run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return run


class MetricsLog:
    """Appends JSON records, one a line, to a metrics file (e.g. <run_dir>/metrics.jsonl), flushed as they come.
    Only rank 0 writes; on other ranks it does nothing. A context manager: the file closes on leaving."""

    def __init__(self, path):
        self.file = open(path, "a") if rank() == 0 else None

    def __call__(self, rec: dict):
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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

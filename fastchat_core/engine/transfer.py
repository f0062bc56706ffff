"""Host lists to the device without a sync, for the runner's inputs and the sampler's per-row settings.

A copy from pageable memory waits for the stream, and the engine queues the next step's forward before the
previous step's tokens reach the host: so the host tensor is pinned (on CUDA) and the copy is asynchronous
(the caching host allocator keeps the pinned buffer alive until the copy is done).
"""
import torch


def pinned(device: torch.device, data, dtype) -> torch.Tensor:
    """`data` as a host tensor, in pinned memory when `device` is a GPU."""
    return torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(device: torch.device, data, dtype) -> torch.Tensor:
    """`data` on `device`, copied asynchronously from pinned memory."""
    return pinned(device, data, dtype).to(device, non_blocking=True)

"""Bits per byte: a tokenizer-independent validation loss."""
import math

import torch
import torch.distributed as dist

from fastchat_core.common import is_dist


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor) -> float:
    """Sum of per-token losses (nats) over the bytes those tokens stand for, in bits.

    Special tokens (0 bytes) and ignored targets (-1) are left out of both sums, so the number does not
    depend on the vocabulary. Under torchrun the sums are reduced over ranks.
    """
    nats = None
    nbytes = None
    for x, y in batches:
        loss = model(x, y, reduction="none").float().flatten()
        y = y.flatten()
        valid = y >= 0
        b = torch.where(valid, token_bytes.to(y.device)[y.clamp(min=0)], torch.zeros_like(y))
        counted = b > 0
        s = (loss * counted).sum()
        n = b.sum()
        nats = s if nats is None else nats + s
        nbytes = n if nbytes is None else nbytes + n
    if nats is None:
        raise ValueError("evaluate_bpb got no batches")
    if is_dist():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes)
    return (nats / (math.log(2) * nbytes.clamp(min=1))).item()

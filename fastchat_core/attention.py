"""Training / prefill attention backend.

On Hopper the cuDNN SDPA backend is the fastest attention we have (PERF.md: 541 TFLOP/s vs 294 for the
flash backend), so it goes first in SDPA's priority list; flash-attn is used when a user has it installed.
Inputs are token-major (B, T, H, D) as the model produces them.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # optional: never required
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def backend_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa-cpu"
    return "flash-attn" if flash_attn_func is not None else "sdpa (cudnn first)"


def causal_attention(q, k, v):
    """Causal self-attention over (B, T, H, D) tensors; k/v may have fewer heads (GQA/MQA)."""
    if q.is_cuda and flash_attn_func is not None and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)
    if q.is_cuda:
        with sdpa_kernel(_SDPA_ORDER, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)

"""The one dispatch point for fused kernels.

On CUDA tensors each op runs our Triton kernel; elsewhere (CPU, or when Triton is missing) it runs the
PyTorch reference that sits beside the kernel in triton_kernels/. FASTCHAT_REFERENCE=1 (or
`use_reference(True)`) forces the reference everywhere, e.g. to compare kernels on/off in one run; it also
sends the engine's prefill attention to SDPA per sequence instead of the flash varlen kernel (attention.py).
The paged-KV ops are C++/CUDA (csrc/) and dispatch by device inside PyTorch's dispatcher.
"""
import os

import torch

from fastchat_core.triton_kernels.muon_ns import NORM_SAFETY, newton_schulz_reference
from fastchat_core.triton_kernels.rope_qknorm import rope_qknorm_reference
from fastchat_core.triton_kernels.softcap_ce import softcap_ce_reference

_force_reference = os.environ.get("FASTCHAT_REFERENCE", "0") == "1"


def use_reference(flag: bool = True):
    """Force (or stop forcing) the PyTorch references, whatever the device."""
    global _force_reference
    _force_reference = flag


def use_kernel(t: torch.Tensor) -> bool:
    """Whether an op on `t` runs its fused kernel (CUDA, reference not forced)."""
    return t.is_cuda and not _force_reference


def rope_qknorm(q, k, cos, sin, positions=None, eps=1e-6, scale=1.0):
    """RMSNorm (no weight) then rotary, times scale, on q (..., T, Hq, D) and k (..., T, Hk, D); returns (q, k)."""
    if use_kernel(q):
        from fastchat_core.triton_kernels.rope_qknorm import rope_qknorm_triton
        return rope_qknorm_triton(q, k, cos, sin, positions, eps, scale)
    return rope_qknorm_reference(q, k, cos, sin, positions, eps, scale)


def softcap_cross_entropy(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean"):
    """LM head + softcap + cross-entropy without materializing the logits; fp32 loss."""
    if use_kernel(x):
        from fastchat_core.triton_kernels.softcap_ce import softcap_ce_triton
        return softcap_ce_triton(x, weight, targets, softcap, ignore_index, reduction)
    return softcap_ce_reference(x, weight, targets, softcap, ignore_index, reduction)


def newton_schulz(G, steps=5, safety=NORM_SAFETY):
    """Orthogonalize a stack (..., m, n) of same-shape matrices (Polar Express iteration), bf16 out.
    safety: X is first divided by safety * its Frobenius norm (1.02 ours, 1.01 nanochat's)."""
    if use_kernel(G):
        from fastchat_core.triton_kernels.muon_ns import newton_schulz_triton
        return newton_schulz_triton(G, steps, safety=safety)
    # bf16 is a GPU speed trick; CPUs without bf16 units emulate it slowly, so they iterate in fp32
    return newton_schulz_reference(G, steps, dtype=torch.bfloat16 if G.is_cuda else torch.float32, safety=safety)


def reshape_and_cache(key, value, key_cache, value_cache, slot_mapping):
    from fastchat_core import csrc_ops
    return csrc_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query, key_cache, value_cache, block_tables, context_lens, scale, *args):
    from fastchat_core import csrc_ops
    return csrc_ops.paged_attention(query, key_cache, value_cache, block_tables, context_lens, scale, *args)

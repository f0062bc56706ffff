"""LM head + logit softcap + cross-entropy, fused and chunked over tokens: the (N, V) logits never exist.

loss_i = logsumexp_j(z_ij) - z_i,target_i  with  z = softcap * tanh(x @ W.T / softcap)  (no cap when softcap
is None or 0); targets equal to ignore_index contribute nothing. At d20 (N=32,768 tokens, V=65,536) the fp32
logits alone would be 8.6 GB, so both paths walk the tokens in chunks.

The Triton path does all the work in the forward pass, chunk by chunk of C tokens:
  1. logits_c = x_c @ W.T                                 cuBLAS, in the input dtype, into one reused buffer
  2. one Triton kernel per chunk: per row, an fp32 logsumexp of the capped logits, the loss, and
     d(loss)/d(logits) = scale * (softmax - onehot) * (1 - tanh^2) written IN PLACE over the logits
  3. grad_x_c = dlogits_c @ W,  grad_W += dlogits_c.T @ x_c        cuBLAS
so the GEMMs are the 6*N*H*V FLOPs of an unfused head and the only big extra memory is the (C, V) buffer.
Backward then only multiplies the saved gradients by the (scalar) grad_output. For reduction="none" a
per-token grad_output cannot be applied after the fact to grad_W (a sum over tokens), so there the forward
only computes the losses and the backward redoes the chunk loop with scale = grad_output per row: one
extra GEMM, exact for any grad_output (RL weighs tokens by advantages).

grad_W accumulates in the input dtype (as do the GEMM outputs): an fp32 accumulator would be 335 MB at
d20, most of the 0.5 GB budget, and the gradient is handed back in the input dtype anyway; the chunks are
3,072 tokens at d20, so that is 10 extra roundings, each of a sum over a whole chunk.

Measured at d20 (bf16, fwd+bwd) on an H200, same runs as the baselines (bench/results/kernels_ce_d20_*_h200.json):
27.5-28.1 ms in three runs (1.12-1.17x the 6NHV floor at the run's measured matmul rate) and 0.40 GB beyond the inputs and
gradients, against 30.5 ms / 4.3 GB for torch.compile of the unfused ops and 33.1 ms / 0.13 GB for Liger.
The three GEMMs alone take 24.5-24.9 ms; the loss/gradient kernel alone 3.1 ms, at the bound of its three passes
over the logits in DRAM (keeping a row on chip for one pass would need 128 KB of shared memory per row).

The PyTorch reference runs the same chunking with fp32 math and recomputes the logits in backward (it
is what CPU training runs, where memory matters more than the one extra GEMM).
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_REDUCTIONS = ("mean", "sum", "none")
# The one (C, V) logits buffer of the Triton path: 3,072 tokens at d20 in bf16. Fwd+bwd at d20 on an H100
# for C = 2,048 / 3,072 / 4,096: 30.0 / 29.1 / 28.7 ms with 0.27 / 0.40 / 0.54 GB extra: the largest that
# stays inside the 0.5 GB budget.
_KERNEL_CHUNK_BYTES = 384 << 20
_REFERENCE_CHUNK_BYTES = 64 << 20   # each fp32 (C, V) temporary of the reference (it holds a few at once)


def _check(x, weight, targets, reduction):
    """Errors a caller can make, with the fix; shared by both paths."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be (N, H) and weight (V, H); got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         " (flatten batch and time first: x.flatten(0, 1), targets.flatten())")
    if targets.shape != x.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64 of shape ({x.shape[0]},), one per row of x; "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}: cast both to the compute dtype")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _chunk_rows(chunk_size, V, elem_bytes, budget_bytes):
    """Rows per chunk: as asked, or as many as fit the budget in a (rows, V) buffer, in multiples of 128
    so the GEMM tiles stay full."""
    if chunk_size:
        return chunk_size
    return max(128, budget_bytes // (V * elem_bytes) // 128 * 128)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the CPU path in production and the tests' oracle. fp32 math (fp64 for fp64 inputs).

class _SoftcapCEReference(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, chunk):
        dtype = torch.promote_types(x.dtype, torch.float32)
        w = weight.to(dtype)
        losses = torch.empty(x.shape[0], dtype=dtype, device=x.device)
        lse = torch.empty_like(losses)
        for s in range(0, x.shape[0], chunk):
            z = x[s:s + chunk].to(dtype) @ w.t()
            if softcap:
                z = softcap * torch.tanh(z / softcap)
            t = targets[s:s + chunk]
            valid = t != ignore_index
            lse[s:s + chunk] = torch.logsumexp(z, dim=1)
            z_t = z.gather(1, torch.where(valid, t, 0).long()[:, None])[:, 0]
            losses[s:s + chunk] = torch.where(valid, lse[s:s + chunk] - z_t, 0.0)
        n_valid = (targets != ignore_index).sum().clamp(min=1)   # a tensor: no host sync
        ctx.save_for_backward(x, weight, targets, lse, n_valid)
        ctx.softcap, ctx.ignore_index, ctx.reduction, ctx.chunk = softcap, ignore_index, reduction, chunk
        if reduction == "none":
            return losses
        return losses.sum() / n_valid if reduction == "mean" else losses.sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, targets, lse, n_valid = ctx.saved_tensors
        softcap, chunk, dtype = ctx.softcap, ctx.chunk, lse.dtype
        # d(loss)/d(loss_i): grad_output per token for "none", the same for every token otherwise.
        row_scale = grad / n_valid if ctx.reduction == "mean" else grad
        row_scale = row_scale.to(dtype).expand(x.shape[0])
        w = weight.to(dtype)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
        grad_w = torch.zeros_like(w)
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, x.shape[0], chunk):
                xc, t = x[s:s + chunk].to(dtype), targets[s:s + chunk]
                valid = t != ctx.ignore_index
                z = xc @ w.t()
                if softcap:
                    th = torch.tanh(z / softcap)
                    z = softcap * th
                d = torch.exp(z - lse[s:s + chunk, None])   # softmax
                d[torch.arange(d.shape[0], device=d.device), torch.where(valid, t, 0).long()] -= 1.0
                if softcap:
                    d *= 1.0 - th * th
                d *= (row_scale[s:s + chunk] * valid)[:, None]
                grad_x[s:s + chunk] = d @ w
                grad_w.addmm_(d.t(), xc)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None, None, None, None


def softcap_ce_reference(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean", *, chunk_size=None):
    """Cross-entropy of softcap * tanh(x @ weight.T / softcap) against targets, chunked over tokens.

    x (N, H) and weight (V, H) of one dtype; targets (N,) int, ignore_index marks tokens to skip.
    reduction "mean" (over non-ignored tokens; 0 when all are ignored), "sum", or "none" ((N,) losses, 0 at
    ignored tokens). Returns fp32 (fp64 for fp64 inputs); differentiable in x and weight. softcap None or 0
    means no cap. chunk_size: tokens per chunk (default: about 64 MB per fp32 (chunk, V) temporary).
    """
    _check(x, weight, targets, reduction)
    chunk = _chunk_rows(chunk_size, weight.shape[0], 4, _REFERENCE_CHUNK_BYTES)
    with torch.autocast(x.device.type, enabled=False):   # fp32 math even inside a bf16 autocast region
        return _SoftcapCEReference.apply(x, weight, targets, softcap or 0.0, ignore_index, reduction, chunk)


# ----------------------------------------------------------------------------------------------------
# Triton kernel: one program per row of a chunk's logits.

# (BLOCK_V, num_warps) for one program per row. On an H200 at d20 (bf16 chunks of 3,072 x 65,536) these
# take 3.08-3.50 ms over all chunks, 16384 x 32 the fastest: three DRAM passes (read, re-read, write) at
# ~4.2 TB/s, since each SM holds several 128 KB rows and the re-read misses L2. A fixed few programs per SM
# walking the rows, so the re-read would hit L2, measured 3.4-5.9 ms: too few loads in flight
# (results/kernels_ce_d20_96f15e0_h200.json; bench/NOTES.md). bench_kernels times each config.
CONFIGS = [(1024, 4), (2048, 4), (4096, 8), (8192, 16), (16384, 32)]


def _configs():
    # The interpreter cannot benchmark, so it gets one config, with a small block so the tests cover the
    # loop over V and its ragged tail.
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 128}, num_warps=4)]
    return [triton.Config({"BLOCK_V": bv}, num_warps=warps) for bv, warps in CONFIGS]


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """tanh(x) and its derivative 1 - tanh(x)^2, in fp32.

    FAST: the hardware's tanh.approx.f32, one special-function op (relative error ~2^-11: the rounding of
    fp16 logits, a quarter of bf16's; in the flat tails, |x| > ~4, 1 - tanh^2 < 1e-3 keeps only that absolute
    accuracy, clamped at 0); else through r = 1 / (exp(2x) + 1): tanh = 1 - 2r, 1 - tanh^2 = 4r(1 - r),
    two ops, exact at both tails (exp -> inf gives r = 0, exp -> 0 gives r = 1)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return t, tl.maximum(1.0 - t * t, 0.0)
    else:
        r = 1.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)   # 2 * log2(e)
        return 1.0 - 2.0 * r, 4.0 * r * (1.0 - r)


# restore_value: the kernel overwrites the logits with their gradient, so autotuning must put them back
# between trials.
@triton.autotune(configs=_configs(), key=["V", "HAS_CAP", "WRITE_GRAD", "FAST"], restore_value=["logits_ptr"])
@triton.jit
def _softcap_ce_kernel(logits_ptr, targets_ptr, scale_ptr, losses_ptr, V, stride_row, scale_stride,
                       softcap, ignore_index,
                       HAS_CAP: tl.constexpr, WRITE_GRAD: tl.constexpr, FAST: tl.constexpr, BLOCK_V: tl.constexpr):
    # The special-function unit (exp2, reciprocal, tanh: 16 per clock per SM) bounds the capped path as
    # much as memory does, so it uses the fewest: per element and pass, tanh (one op with FAST, see _tanh)
    # and one exp2 (exact tanh: 3.95 ms for the d20 chunks on an H200, FAST: 3.08 ms, at the DRAM bound);
    # exp(z - c) needs no running max since z <= c.
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=logits_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(row_ptr + start + cols, zeros, mask=start + cols < V)
    else:
        # Pass 1: logsumexp in fp32.
        inv_cap = 1.0 / softcap
        cap_log2e = softcap * LOG2E
        if HAS_CAP:
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                logits = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                t, _ = _tanh(logits * inv_cap, FAST)
                acc += tl.where(mask, tl.exp2((t - 1.0) * cap_log2e), 0.0)   # exp(z - c)
            lse = softcap + tl.log(tl.sum(acc, axis=0))
            # the target's z with the same tanh as the sum (so the loss stays >= 0), its derivative exact:
            # the target carries the row's largest gradient, (p - 1) * dt
            x_target = tl.load(row_ptr + target).to(tl.float32) * inv_cap
            t_target, _ = _tanh(x_target, FAST)
            _, dt_target = _tanh(x_target, False)
            z_target = softcap * t_target
        else:
            # Online logsumexp: a running max m and the sum s of exp(z - m), rescaled when m grows.
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                z = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E), axis=0)
                m = m_new
            lse = m + tl.log(s)
            z_target = tl.load(row_ptr + target).to(tl.float32)
        tl.store(losses_ptr + row, lse - z_target)
        # Pass 2: the gradient, over the logits (each element is read before this program overwrites it).
        if WRITE_GRAD:
            scale = tl.load(scale_ptr + row * scale_stride)
            for start in range(0, V, BLOCK_V):
                mask = start + cols < V
                logits = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    t, dt = _tanh(logits * inv_cap, FAST)
                    p = tl.exp2((t - 1.0) * cap_log2e + (softcap - lse) * LOG2E)   # exp(z - c) * exp(c - lse)
                else:
                    p = tl.exp2((logits - lse) * LOG2E)
                is_target = start + cols == target
                g = p - tl.where(is_target, 1.0, 0.0)
                if HAS_CAP:
                    g = g * tl.where(is_target, dt_target, dt)
                tl.store(row_ptr + start + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def loss_and_grad_(logits, targets, scale, losses, softcap, ignore_index, write_grad=True, fast_tanh=None,
                   config=None):
    """The Triton kernel on one chunk's (C, V) logits: losses (C,) fp32, and with write_grad the logits
    are overwritten by scale * d(loss)/d(logits). scale: fp32, (1,) or (C,). fast_tanh (default: for
    16-bit logits, whose own rounding is as large; never in the interpreter): see _tanh. config: one
    (BLOCK_V, num_warps) of CONFIGS instead of the autotuned choice (the benchmark times each)."""
    if fast_tanh is None:
        fast_tanh = logits.element_size() == 2
    fast_tanh = fast_tanh and not _INTERPRET
    kernel, extra = _softcap_ce_kernel, {}
    if config is not None:
        kernel, extra = _softcap_ce_kernel.fn, dict(BLOCK_V=config[0], num_warps=config[1])
    kernel[(logits.shape[0],)](
        logits, targets, scale, losses, logits.shape[1], logits.stride(0), 0 if scale.numel() == 1 else 1,
        float(softcap or 1.0), ignore_index, HAS_CAP=bool(softcap), WRITE_GRAD=write_grad, FAST=fast_tanh, **extra)


def softcap_ce_into(x, weight, targets, scale, losses, grad_x=None, grad_weight=None,
                    softcap=15.0, ignore_index=-1, chunk_size=None):
    """The chunk loop of the Triton path, writing into caller-provided buffers (nothing is reduced here).

    losses (N,) fp32 gets the per-token losses (0 at ignored tokens). With grad_x (N, H) and grad_weight
    (V, H) given (input dtype), they get the gradient of sum_i scale_i * loss_i, where scale is a fp32
    device tensor of shape (1,) (the same for every token: 1/n_valid for a mean) or (N,) (per token).
    Every element of each buffer is written, so they can come from torch.empty.
    """
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError("softcap_ce_triton needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use softcap_ce_reference on CPU")
    N, V = x.shape[0], weight.shape[0]
    C = _chunk_rows(chunk_size, V, x.element_size(), _KERNEL_CHUNK_BYTES)
    write_grad = grad_x is not None
    x, targets = x.contiguous(), targets.contiguous()
    buffer = torch.empty(min(C, N), V, dtype=x.dtype, device=x.device)
    if write_grad and N == 0:
        grad_weight.zero_()
    with torch.autocast(x.device.type, enabled=False):   # the GEMMs run in the input dtype, as documented
        for start in range(0, N, C):
            end = min(start + C, N)
            xc, logits = x[start:end], buffer[: end - start]
            torch.mm(xc, weight.t(), out=logits)
            row_scale = scale if scale.numel() == 1 else scale[start:end]
            loss_and_grad_(logits, targets[start:end], row_scale, losses[start:end], softcap, ignore_index, write_grad)
            if write_grad:
                torch.mm(logits, weight, out=grad_x[start:end])
                # beta=0 on the first chunk: grad_weight's old contents (torch.empty) are ignored, not added.
                grad_weight.addmm_(logits.t(), xc, beta=float(start > 0))
    return losses


# ----------------------------------------------------------------------------------------------------
# Custom ops, so torch.compile treats the fused head as opaque calls (no graph breaks), with autograd.

def _reduce_scale(targets, ignore_index, reduction):
    """The per-token weight of the reduced loss as a (1,) fp32 device tensor: 1/n_valid for a mean."""
    if reduction == "mean":
        return (1.0 / (targets != ignore_index).sum().clamp(min=1)).float().reshape(1)
    return torch.ones(1, dtype=torch.float32, device=targets.device)


@torch.library.custom_op("fastchat_triton::softcap_ce", mutates_args=())
def _softcap_ce_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                   ignore_index: int, reduction: str, compute_grad: bool,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_x, grad_weight). For "mean"/"sum" with compute_grad, the gradients of the loss are
    computed here, in the forward; otherwise they are empty and backward (for "none") recomputes."""
    with_grad = compute_grad and reduction != "none"
    scale = _reduce_scale(targets, ignore_index, reduction)
    losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if with_grad else x.new_empty(0)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if with_grad else x.new_empty(0)
    softcap_ce_into(x, weight, targets, scale, losses, grad_x if with_grad else None,
                    grad_w if with_grad else None, softcap, ignore_index, chunk_size)
    loss = losses if reduction == "none" else (losses.sum() * scale).squeeze(0)
    return loss, grad_x, grad_w


@_softcap_ce_op.register_fake
def _(x, weight, targets, softcap, ignore_index, reduction, compute_grad, chunk_size):
    _check(x, weight, targets, reduction)
    with_grad = compute_grad and reduction != "none"
    loss = x.new_empty(x.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, x.new_empty(x.shape if with_grad else 0), x.new_empty(weight.shape if with_grad else 0)


@torch.library.custom_op("fastchat_triton::softcap_ce_backward", mutates_args=())
def _softcap_ce_backward_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            grad_losses: torch.Tensor, softcap: float, ignore_index: int,
                            chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_losses_i * loss_i (reduction "none"), by redoing the chunk loop."""
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)   # recomputed, unused
    softcap_ce_into(x, weight, targets, grad_losses.float().contiguous(), losses, grad_x, grad_w,
                    softcap, ignore_index, chunk_size)
    return grad_x, grad_w


@_softcap_ce_backward_op.register_fake
def _(x, weight, targets, grad_losses, softcap, ignore_index, chunk_size):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, targets, softcap, ignore_index, reduction, compute_grad, chunk_size = inputs
    _, grad_x, grad_w = output
    # The gradient outputs are carried to backward, not differentiated: no zero-filled grads for them.
    ctx.mark_non_differentiable(grad_x, grad_w)
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.softcap, ctx.ignore_index, ctx.chunk_size = reduction, softcap, ignore_index, chunk_size
    if reduction == "none":
        ctx.save_for_backward(x, weight, targets)
    else:
        ctx.save_for_backward(grad_x, grad_w)


def _backward(ctx, grad_loss, _grad_x, _grad_w):
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    if ctx.reduction == "none":
        x, weight, targets = ctx.saved_tensors
        grad_x, grad_w = _softcap_ce_backward_op(x, weight, targets, grad_loss, ctx.softcap, ctx.ignore_index,
                                                 ctx.chunk_size)
    else:
        grad_x, grad_w = ctx.saved_tensors
        grad_x, grad_w = grad_x * grad_loss, grad_w * grad_loss
    return grad_x, grad_w, None, None, None, None, None, None


_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


def softcap_ce_triton(x, weight, targets, softcap=15.0, ignore_index=-1, reduction="mean", *, chunk_size=None):
    """Same signature and result as softcap_ce_reference, through the fused path: cuBLAS GEMMs plus one
    Triton kernel per chunk (CUDA tensors, or CPU under TRITON_INTERPRET=1). Differentiable in x and
    weight; the gradients are computed in the forward when autograd will want them.

    chunk_size: tokens per chunk (default: a ~400 MB (chunk, V) buffer, 3,072 tokens at V=65,536 in bf16).
    The first call per (V, softcap on/off) autotunes: warm up before CUDA graph capture. Targets outside
    [0, V) other than ignore_index are not checked here (that would sync the GPU).
    """
    _check(x, weight, targets, reduction)
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    loss, _, _ = _softcap_ce_op(x, weight, targets, float(softcap or 0.0), ignore_index, reduction,
                                compute_grad, chunk_size or 0)
    return loss

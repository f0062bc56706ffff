"""QK-norm + rotary embedding, fused: one read and one write of q and k per pass.

out = rotate(rms_norm(x)) for x in (q, k): RMSNorm without weights over head_dim (fp32 math), then the
half-split rotation  y1 = x1*cos + x2*sin,  y2 = x2*cos - x1*sin  with x1, x2 the two halves of a head.
Unfused, this is ~5 elementwise passes each way; fused, forward reads x and writes y, backward reads x and
dy and writes dx (the norm is recomputed, nothing is saved but the inputs): 10 passes of q+k in all.

Layout: q (..., T, Hq, D) and k (..., T, Hk, D), token-major as `(x @ Wq.T).view(B, T, H, D)` gives them,
contiguous in D; the token and head strides can be anything (slices of a fused qkv, transposed grads),
so nothing is copied. Token (b, t) uses table row t, or positions[b, t] when positions is given (the
engine's packed ragged batches: q (N, Hq, D), positions (N,)). The tables are not differentiated.

Each kernel program takes BLOCK_T tokens and every head of both q and k for them, so each token's cos/sin
row is loaded once per pass (not once per head) and (b, t) is computed once per token.
"""
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the CPU path in production and the tests' oracle (float64 inputs -> float64 math).

def _check(q, k, cos, sin, positions):
    """Shape errors a caller can make, with the fix; shared by the reference, the kernel and the fake."""
    if q.dim() < 3 or k.dim() < 3:
        raise ValueError(f"q and k must be (..., T, heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D or D % 2 or D > 256:
        raise ValueError(f"q and k need the same even head_dim <= 256; got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q and k must cover the same tokens: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D // 2:
        raise ValueError(f"cos and sin must both be (max_T, head_dim // 2) = (*, {D // 2}); "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if positions is None:
        if q.shape[-3] > cos.shape[0]:
            raise ValueError(f"T={q.shape[-3]} tokens but the rotary tables have {cos.shape[0]} rows: "
                             f"build them for a longer max sequence length")
    elif positions.shape != q.shape[:-2] or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an int32/int64 tensor of shape {tuple(q.shape[:-2])} (one per "
                         f"token); got {positions.dtype} {tuple(positions.shape)}")


def _rope_qknorm_one(x, cos, sin, positions, eps):
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if positions is None:
        c, s = cos[: x.shape[-3]], sin[: x.shape[-3]]    # (T, D/2), broadcast over leading dims
    else:
        c, s = cos[positions], sin[positions]            # (..., D/2), one row per token
    c, s = c.to(dtype).unsqueeze(-2), s.to(dtype).unsqueeze(-2)  # broadcast over heads
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1).to(x.dtype)


def rope_qknorm_reference(q, k, cos, sin, positions=None, eps=1e-6):
    """rotate(rms_norm(x)) for q (..., T, Hq, D) and k (..., T, Hk, D); returns (q_out, k_out) in the
    input dtypes. Plain PyTorch, differentiable; fp32 math (fp64 when the inputs are fp64)."""
    _check(q, k, cos, sin, positions)
    return _rope_qknorm_one(q, cos, sin, positions, eps), _rope_qknorm_one(k, cos, sin, positions, eps)


# ----------------------------------------------------------------------------------------------------
# Triton kernels

def _configs():
    # The interpreter cannot benchmark, so it gets one config; on the GPU, a short list to tune over.
    # A tile is [BLOCK_T, heads padded to a power of two, HALF_P]: small BLOCK_T suits many heads, large few
    # (at 10 heads, D=128, BLOCK_T=16 already spills in the backward).
    if _INTERPRET:
        return [triton.Config({"BLOCK_T": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": 1}, num_warps=4),
        triton.Config({"BLOCK_T": 2}, num_warps=4),
        triton.Config({"BLOCK_T": 4}, num_warps=4),
        triton.Config({"BLOCK_T": 4}, num_warps=8),
        triton.Config({"BLOCK_T": 8}, num_warps=8),
        triton.Config({"BLOCK_T": 16}, num_warps=4),
    ]


@triton.jit
def _token_block(cos_ptr, sin_ptr, pos_ptr, N, T, stab,
                 HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_T: tl.constexpr, HAS_POS: tl.constexpr):
    """This program's BLOCK_T tokens: their (b, t) and cos/sin (fp32, [BLOCK_T, 1, HALF_P]), loaded once
    and broadcast over every head of q and k."""
    n = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)     # flattened token index b * T + t
    tmask = n < N
    b = n // T
    t = n - b * T
    cols = tl.arange(0, HALF_P)
    mask = tmask[:, None] & (cols[None, :] < HALF)
    if HAS_POS:
        r = tl.load(pos_ptr + n, mask=tmask, other=0).to(tl.int64)
    else:
        r = t.to(tl.int64)
    off = r[:, None] * stab + cols[None, :]
    c = tl.load(cos_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return b.to(tl.int64), t.to(tl.int64), tmask, c[:, None, :], s[:, None, :]


# All heads in one [BLOCK_T, H_P, HALF_P] tile rather than a loop over heads: a loop would wait out one
# load latency per head in turn (a decode step has few tokens, so few programs, to hide it), while the
# tile has every head's loads in flight at once. The price is padding heads to a power of two (10 -> 16),
# masked lanes that cost registers but no memory traffic.

@triton.jit
def _offsets(row, sh, tmask, H: tl.constexpr, H_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """Element offsets of the first halves of this block's heads (row: each token's offset), and the mask.
    The halves are loaded apart, not as one [.., D] tile then split: HALF need not be a power of two."""
    heads = tl.arange(0, H_P)
    cols = tl.arange(0, HALF_P)
    off = row[:, None, None] + (heads.to(tl.int64) * sh)[None, :, None] + cols[None, None, :]
    mask = tmask[:, None, None] & (heads < H)[None, :, None] & (cols < HALF)[None, None, :]
    return off, mask


@triton.jit
def _fwd_tile(x_ptr, y_ptr, xrow, yrow, sxh, syh, tmask, c, s, eps,
              H: tl.constexpr, H_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    xo, mask = _offsets(xrow, sxh, tmask, H, H_P, HALF, HALF_P)
    yo, _ = _offsets(yrow, syh, tmask, H, H_P, HALF, HALF_P)
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF) + eps)[:, :, None]
    x1 = x1 * rstd
    x2 = x2 * rstd
    tl.store(y_ptr + yo, (x1 * c + x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + yo + HALF, (x2 * c - x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(x_ptr, g_ptr, dx_ptr, xrow, grow, drow, sxh, sgh, sdh, tmask, c, s, eps,
              H: tl.constexpr, H_P: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    xo, mask = _offsets(xrow, sxh, tmask, H, H_P, HALF, HALF_P)
    go, _ = _offsets(grow, sgh, tmask, H, H_P, HALF, HALF_P)
    do, _ = _offsets(drow, sdh, tmask, H, H_P, HALF, HALF_P)
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(g_ptr + go, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(g_ptr + go + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)) / (2 * HALF) + eps)[:, :, None]
    n1 = x1 * rstd
    n2 = x2 * rstd
    # Undo the rotation (its transpose), then the norm: dx = rstd * (dn - n * mean(dn * n)).
    dn1 = g1 * c - g2 * s
    dn2 = g1 * s + g2 * c
    dot = ((tl.sum(dn1 * n1, axis=2) + tl.sum(dn2 * n2, axis=2)) / (2 * HALF))[:, :, None]
    tl.store(dx_ptr + do, (rstd * (dn1 - n1 * dot)).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + do + HALF, (rstd * (dn2 - n2 * dot)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=["HQ", "HK", "HALF", "HAS_POS"])
@triton.jit
def _rope_qknorm_fwd_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, N, T, eps,
                            sqb, sqt, sqh, skb, skt, skh, sqob, sqot, sqoh, skob, skot, skoh, stab,
                            HQ: tl.constexpr, HQ_P: tl.constexpr, HK: tl.constexpr, HK_P: tl.constexpr,
                            HALF: tl.constexpr, HALF_P: tl.constexpr, HAS_POS: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    b, t, tmask, c, s = _token_block(cos_ptr, sin_ptr, pos_ptr, N, T, stab, HALF, HALF_P, BLOCK_T, HAS_POS)
    _fwd_tile(q_ptr, qo_ptr, b * sqb + t * sqt, b * sqob + t * sqot, sqh, sqoh, tmask, c, s, eps,
              HQ, HQ_P, HALF, HALF_P)
    _fwd_tile(k_ptr, ko_ptr, b * skb + t * skt, b * skob + t * skot, skh, skoh, tmask, c, s, eps,
              HK, HK_P, HALF, HALF_P)


@triton.autotune(configs=_configs(), key=["HQ", "HK", "HALF", "HAS_POS"])
@triton.jit
def _rope_qknorm_bwd_kernel(q_ptr, k_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, cos_ptr, sin_ptr, pos_ptr,
                            N, T, eps, sqb, sqt, sqh, skb, skt, skh, sgqb, sgqt, sgqh, sgkb, sgkt, sgkh,
                            sdqb, sdqt, sdqh, sdkb, sdkt, sdkh, stab,
                            HQ: tl.constexpr, HQ_P: tl.constexpr, HK: tl.constexpr, HK_P: tl.constexpr,
                            HALF: tl.constexpr, HALF_P: tl.constexpr, HAS_POS: tl.constexpr,
                            BLOCK_T: tl.constexpr):
    b, t, tmask, c, s = _token_block(cos_ptr, sin_ptr, pos_ptr, N, T, stab, HALF, HALF_P, BLOCK_T, HAS_POS)
    _bwd_tile(q_ptr, gq_ptr, dq_ptr, b * sqb + t * sqt, b * sgqb + t * sgqt, b * sdqb + t * sdqt,
              sqh, sgqh, sdqh, tmask, c, s, eps, HQ, HQ_P, HALF, HALF_P)
    _bwd_tile(k_ptr, gk_ptr, dk_ptr, b * skb + t * skt, b * sgkb + t * sgkt, b * sdkb + t * sdkt,
              skh, sgkh, sdkh, tmask, c, s, eps, HK, HK_P, HALF, HALF_P)


# ----------------------------------------------------------------------------------------------------
# Launchers: write into caller-given outputs (the tests poison them to prove every element is written).

def _as_btd(x):
    """(..., T, H, D) -> a (B, T, H, D) view with unit stride in D; copies only when no such view exists."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, *x.shape[-3:])


def _launch_args(q, k, cos, sin, positions):
    _check(q, k, cos, sin, positions)
    for name, t in (("k", k), ("cos", cos), ("sin", sin), ("positions", positions)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: move the rotary tables/positions too")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError("rope_qknorm_triton needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use rope_qknorm_reference on CPU")
    cos, sin = cos.contiguous(), sin.contiguous()
    pos = cos if positions is None else positions.reshape(-1).contiguous()  # dummy pointer when unused
    half = q.shape[-1] // 2
    hq, hk = q.shape[-2], k.shape[-2]
    consts = dict(HQ=hq, HQ_P=triton.next_power_of_2(hq), HK=hk, HK_P=triton.next_power_of_2(hk),
                  HALF=half, HALF_P=triton.next_power_of_2(half), HAS_POS=positions is not None)
    return cos, sin, pos, consts


def _grid(N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_T"]),)


def rope_qknorm_fwd(q, k, cos, sin, positions, eps, q_out, k_out):
    """Forward kernel launch: writes rotate(rms_norm(q)) into q_out and likewise k into k_out (same
    shapes as q and k, any strides with unit stride in D)."""
    cos, sin, pos, consts = _launch_args(q, k, cos, sin, positions)
    N, T = q.shape[:-2].numel(), q.shape[-3]
    if N == 0:
        return q_out, k_out
    qv, kv, qov, kov = _as_btd(q), _as_btd(k), q_out.view(-1, *q.shape[-3:]), k_out.view(-1, *k.shape[-3:])
    _rope_qknorm_fwd_kernel[_grid(N)](
        qv, kv, qov, kov, cos, sin, pos, N, T, eps,
        *qv.stride()[:3], *kv.stride()[:3], *qov.stride()[:3], *kov.stride()[:3], cos.stride(0), **consts)
    return q_out, k_out


def rope_qknorm_bwd(grad_q, grad_k, q, k, cos, sin, positions, eps, dq, dk):
    """Backward kernel launch: from the forward's inputs q, k and the output grads, writes dq and dk."""
    cos, sin, pos, consts = _launch_args(q, k, cos, sin, positions)
    N, T = q.shape[:-2].numel(), q.shape[-3]
    if N == 0:
        return dq, dk
    qv, kv, gqv, gkv = _as_btd(q), _as_btd(k), _as_btd(grad_q), _as_btd(grad_k)
    dqv, dkv = dq.view(-1, *q.shape[-3:]), dk.view(-1, *k.shape[-3:])
    _rope_qknorm_bwd_kernel[_grid(N)](
        qv, kv, gqv, gkv, dqv, dkv, cos, sin, pos, N, T, eps,
        *qv.stride()[:3], *kv.stride()[:3], *gqv.stride()[:3], *gkv.stride()[:3],
        *dqv.stride()[:3], *dkv.stride()[:3], cos.stride(0), **consts)
    return dq, dk


# ----------------------------------------------------------------------------------------------------
# Custom ops, so torch.compile treats the kernels as opaque calls (no graph breaks), with autograd.

@torch.library.custom_op("fastchat_triton::rope_qknorm", mutates_args=())
def _rope_qknorm_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return rope_qknorm_fwd(q, k, cos, sin, positions, eps, q_out, k_out)


@_rope_qknorm_op.register_fake
def _(q, k, cos, sin, positions, eps):
    _check(q, k, cos, sin, positions)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fastchat_triton::rope_qknorm_backward", mutates_args=())
def _rope_qknorm_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return rope_qknorm_bwd(grad_q, grad_k, q, k, cos, sin, positions, eps, dq, dk)


@_rope_qknorm_backward_op.register_fake
def _(grad_q, grad_k, q, k, cos, sin, positions, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, eps = inputs
    ctx.save_for_backward(q, k, cos, sin, positions)
    ctx.eps = eps


def _backward(ctx, grad_q, grad_k):
    q, k, cos, sin, positions = ctx.saved_tensors
    dq, dk = _rope_qknorm_backward_op(grad_q, grad_k, q, k, cos, sin, positions, ctx.eps)
    return dq, dk, None, None, None, None


_rope_qknorm_op.register_autograd(_backward, setup_context=_setup_context)


def rope_qknorm_triton(q, k, cos, sin, positions=None, eps=1e-6):
    """Same signature and result as rope_qknorm_reference, through the fused Triton kernels
    (differentiable in q and k; CUDA tensors, or CPU under TRITON_INTERPRET=1).

    The first call per (heads, head_dim, positions or not) autotunes: warm up before CUDA graph capture.
    Positions outside the tables are not checked here (that would sync the GPU)."""
    return _rope_qknorm_op(q, k, cos, sin, positions, eps)

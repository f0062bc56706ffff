"""QK-norm + rotary embedding, fused: one read and one write of q and k per pass.

out = scale * rotate(rms_norm(x)) for x in (q, k): RMSNorm without weights over head_dim (fp32 math), then
the half-split rotation  y1 = x1*cos + x2*sin,  y2 = x2*cos - x1*sin  with x1, x2 the two halves of a head.
The scale (1 unless the model's qk_scale option is on) is folded into the norm's factor: no extra pass.
Unfused, this is ~5 elementwise passes each way; fused, forward reads x and writes y, backward reads x and
dy and writes dx (the norm is recomputed, nothing is saved but the inputs): 10 passes of q+k in all.

Layout: q (..., T, Hq, D) and k (..., T, Hk, D), token-major as `(x @ Wq.T).view(B, T, H, D)` gives them,
contiguous in D; the token and head strides can be anything (slices of a fused qkv, transposed grads),
so nothing is copied. Token (b, t) uses table row t, or positions[b, t] when positions is given (the
engine's packed ragged batches: q (N, Hq, D), positions (N,)). The tables are not differentiated.

Each kernel program takes ROWS (token, head) rows of q or of k; q and k share one launch.
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


def _rope_qknorm_one(x, cos, sin, positions, eps, scale):
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    xf = xf * (torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale)
    if positions is None:
        c, s = cos[: x.shape[-3]], sin[: x.shape[-3]]    # (T, D/2), broadcast over leading dims
    else:
        c, s = cos[positions], sin[positions]            # (..., D/2), one row per token
    c, s = c.to(dtype).unsqueeze(-2), s.to(dtype).unsqueeze(-2)  # broadcast over heads
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1).to(x.dtype)


def rope_qknorm_reference(q, k, cos, sin, positions=None, eps=1e-6, scale=1.0):
    """scale * rotate(rms_norm(x)) for q (..., T, Hq, D) and k (..., T, Hk, D); returns (q_out, k_out) in
    the input dtypes. Plain PyTorch, differentiable; fp32 math (fp64 when the inputs are fp64)."""
    _check(q, k, cos, sin, positions)
    return (_rope_qknorm_one(q, cos, sin, positions, eps, scale),
            _rope_qknorm_one(k, cos, sin, positions, eps, scale))


# ----------------------------------------------------------------------------------------------------
# Triton kernels

def _configs():
    # The interpreter cannot benchmark, so it gets one config; on the GPU, a short list to tune over.
    if _INTERPRET:
        return [triton.Config({"ROWS": 32}, num_warps=4)]
    return [
        triton.Config({"ROWS": 16}, num_warps=4),
        triton.Config({"ROWS": 32}, num_warps=4),
        triton.Config({"ROWS": 32}, num_warps=8),
        triton.Config({"ROWS": 64}, num_warps=8),
    ]


@triton.jit
def _row_offsets(rows, T, sb, st, sh, H: tl.constexpr):
    """Element offset of each (token, head) row, where rows = token * H + head and token = b * T + t."""
    n = rows // H
    h = rows - n * H
    b = n // T
    t = n - b * T
    return b.to(tl.int64) * sb + t.to(tl.int64) * st + h.to(tl.int64) * sh


@triton.jit
def _tables(cos_ptr, sin_ptr, pos_ptr, rows, rmask, cols, mask, T, stab,
            H: tl.constexpr, HAS_POS: tl.constexpr):
    """cos and sin rows (fp32) for each (token, head) row: table row t, or positions[token]."""
    n = rows // H
    if HAS_POS:
        r = tl.load(pos_ptr + n, mask=rmask, other=0).to(tl.int64)
    else:
        r = (n % T).to(tl.int64)
    off = r[:, None] * stab + cols[None, :]
    c = tl.load(cos_ptr + off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def _fwd_tile(x_ptr, y_ptr, cos_ptr, sin_ptr, pos_ptr, tile, n_rows, T, eps, scale,
              sxb, sxt, sxh, syb, syt, syh, stab,
              H: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, ROWS: tl.constexpr,
              HAS_POS: tl.constexpr):
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF_P)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < HALF)
    xp = x_ptr + _row_offsets(rows, T, sxb, sxt, sxh, H)[:, None] + cols[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    x1 = x1 * (rstd * scale)
    x2 = x2 * (rstd * scale)
    c, s = _tables(cos_ptr, sin_ptr, pos_ptr, rows, rmask, cols, mask, T, stab, H, HAS_POS)
    yp = y_ptr + _row_offsets(rows, T, syb, syt, syh, H)[:, None] + cols[None, :]
    tl.store(yp, (x1 * c + x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(yp + HALF, (x2 * c - x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(x_ptr, g_ptr, dx_ptr, cos_ptr, sin_ptr, pos_ptr, tile, n_rows, T, eps, scale,
              sxb, sxt, sxh, sgb, sgt, sgh, sdb, sdt, sdh, stab,
              H: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, ROWS: tl.constexpr,
              HAS_POS: tl.constexpr):
    rows = tile * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, HALF_P)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < HALF)
    xp = x_ptr + _row_offsets(rows, T, sxb, sxt, sxh, H)[:, None] + cols[None, :]
    gp = g_ptr + _row_offsets(rows, T, sgb, sgt, sgh, H)[:, None] + cols[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(gp, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(gp + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    n1 = x1 * rstd
    n2 = x2 * rstd
    c, s = _tables(cos_ptr, sin_ptr, pos_ptr, rows, rmask, cols, mask, T, stab, H, HAS_POS)
    # Undo the scale and the rotation (its transpose), then the norm: dx = rstd * (dn - n * mean(dn * n)).
    dn1 = (g1 * c - g2 * s) * scale
    dn2 = (g1 * s + g2 * c) * scale
    dot = ((tl.sum(dn1 * n1, axis=1) + tl.sum(dn2 * n2, axis=1)) / (2 * HALF))[:, None]
    dp = dx_ptr + _row_offsets(rows, T, sdb, sdt, sdh, H)[:, None] + cols[None, :]
    tl.store(dp, (rstd * (dn1 - n1 * dot)).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dp + HALF, (rstd * (dn2 - n2 * dot)).to(dx_ptr.dtype.element_ty), mask=mask)


# The token counts N and T are not specialized on (Triton would compile a variant, and autotune it, for
# every new N % 16 == 0 / N == 1 class: the engine's ragged prefills would hit those compiles while
# serving). The interpreter binds arguments wrongly with do_not_specialize, and has nothing to save.
_NO_SPEC = [] if _INTERPRET else ["N", "T"]


@triton.autotune(configs=_configs(), key=["HQ", "HK", "HALF", "HAS_POS"])
@triton.jit(do_not_specialize=_NO_SPEC)
def _rope_qknorm_fwd_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, N, T, eps, scale,
                            sqb, sqt, sqh, skb, skt, skh, sqob, sqot, sqoh, skob, skot, skoh, stab,
                            HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                            HAS_POS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(N * HQ, ROWS)
    if pid < q_tiles:
        _fwd_tile(q_ptr, qo_ptr, cos_ptr, sin_ptr, pos_ptr, pid, N * HQ, T, eps, scale,
                  sqb, sqt, sqh, sqob, sqot, sqoh, stab, HQ, HALF, HALF_P, ROWS, HAS_POS)
    else:
        _fwd_tile(k_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, pid - q_tiles, N * HK, T, eps, scale,
                  skb, skt, skh, skob, skot, skoh, stab, HK, HALF, HALF_P, ROWS, HAS_POS)


@triton.autotune(configs=_configs(), key=["HQ", "HK", "HALF", "HAS_POS"])
@triton.jit(do_not_specialize=_NO_SPEC)
def _rope_qknorm_bwd_kernel(q_ptr, k_ptr, gq_ptr, gk_ptr, dq_ptr, dk_ptr, cos_ptr, sin_ptr, pos_ptr,
                            N, T, eps, scale, sqb, sqt, sqh, skb, skt, skh, sgqb, sgqt, sgqh, sgkb, sgkt, sgkh,
                            sdqb, sdqt, sdqh, sdkb, sdkt, sdkh, stab,
                            HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
                            HAS_POS: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    q_tiles = tl.cdiv(N * HQ, ROWS)
    if pid < q_tiles:
        _bwd_tile(q_ptr, gq_ptr, dq_ptr, cos_ptr, sin_ptr, pos_ptr, pid, N * HQ, T, eps, scale,
                  sqb, sqt, sqh, sgqb, sgqt, sgqh, sdqb, sdqt, sdqh, stab, HQ, HALF, HALF_P, ROWS, HAS_POS)
    else:
        _bwd_tile(k_ptr, gk_ptr, dk_ptr, cos_ptr, sin_ptr, pos_ptr, pid - q_tiles, N * HK, T, eps, scale,
                  skb, skt, skh, sgkb, sgkt, sgkh, sdkb, sdkt, sdkh, stab, HK, HALF, HALF_P, ROWS, HAS_POS)


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
    consts = dict(HQ=q.shape[-2], HK=k.shape[-2], HALF=half, HALF_P=triton.next_power_of_2(half),
                  HAS_POS=positions is not None)
    return cos, sin, pos, consts


def _grid(N, HQ, HK):
    return lambda meta: (triton.cdiv(N * HQ, meta["ROWS"]) + triton.cdiv(N * HK, meta["ROWS"]),)


def rope_qknorm_fwd(q, k, cos, sin, positions, eps, q_out, k_out, scale=1.0):
    """Forward kernel launch: writes scale * rotate(rms_norm(q)) into q_out and likewise k into k_out (same
    shapes as q and k, any strides with unit stride in D)."""
    cos, sin, pos, consts = _launch_args(q, k, cos, sin, positions)
    N, T = q.shape[:-2].numel(), q.shape[-3]
    if N == 0:
        return q_out, k_out
    qv, kv, qov, kov = _as_btd(q), _as_btd(k), q_out.view(-1, *q.shape[-3:]), k_out.view(-1, *k.shape[-3:])
    _rope_qknorm_fwd_kernel[_grid(N, consts["HQ"], consts["HK"])](
        qv, kv, qov, kov, cos, sin, pos, N, T, eps, scale,
        *qv.stride()[:3], *kv.stride()[:3], *qov.stride()[:3], *kov.stride()[:3], cos.stride(0), **consts)
    return q_out, k_out


def rope_qknorm_bwd(grad_q, grad_k, q, k, cos, sin, positions, eps, dq, dk, scale=1.0):
    """Backward kernel launch: from the forward's inputs q, k and the output grads, writes dq and dk."""
    cos, sin, pos, consts = _launch_args(q, k, cos, sin, positions)
    N, T = q.shape[:-2].numel(), q.shape[-3]
    if N == 0:
        return dq, dk
    qv, kv, gqv, gkv = _as_btd(q), _as_btd(k), _as_btd(grad_q), _as_btd(grad_k)
    dqv, dkv = dq.view(-1, *q.shape[-3:]), dk.view(-1, *k.shape[-3:])
    _rope_qknorm_bwd_kernel[_grid(N, consts["HQ"], consts["HK"])](
        qv, kv, gqv, gkv, dqv, dkv, cos, sin, pos, N, T, eps, scale,
        *qv.stride()[:3], *kv.stride()[:3], *gqv.stride()[:3], *gkv.stride()[:3],
        *dqv.stride()[:3], *dkv.stride()[:3], cos.stride(0), **consts)
    return dq, dk


# ----------------------------------------------------------------------------------------------------
# Custom ops, so torch.compile treats the kernels as opaque calls (no graph breaks), with autograd.

def _fresh(q, k):
    """Outputs shaped like q and k, contiguous whatever the inputs' strides."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


@torch.library.custom_op("fastchat_triton::rope_qknorm", mutates_args=())
def _rope_qknorm_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor | None, eps: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qknorm_fwd(q, k, cos, sin, positions, eps, *_fresh(q, k), scale)


@_rope_qknorm_op.register_fake
def _(q, k, cos, sin, positions, eps, scale=1.0):
    _check(q, k, cos, sin, positions)
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("fastchat_triton::rope_qknorm_backward", mutates_args=())
def _rope_qknorm_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None,
                             eps: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qknorm_bwd(grad_q, grad_k, q, k, cos, sin, positions, eps, *_fresh(q, k), scale)


@_rope_qknorm_backward_op.register_fake
def _(grad_q, grad_k, q, k, cos, sin, positions, eps, scale=1.0):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, eps, scale = inputs
    ctx.save_for_backward(q, k, cos, sin, positions)
    ctx.eps, ctx.scale = eps, scale


def _backward(ctx, grad_q, grad_k):
    q, k, cos, sin, positions = ctx.saved_tensors
    dq, dk = _rope_qknorm_backward_op(grad_q, grad_k, q, k, cos, sin, positions, ctx.eps, ctx.scale)
    return dq, dk, None, None, None, None, None


_rope_qknorm_op.register_autograd(_backward, setup_context=_setup_context)


class _RopeQKNormEager(torch.autograd.Function):
    """The same two launches as the custom ops, for eager callers, without the ops' Python dispatch
    (schema checks, fake-tensor plumbing, a second op for backward): at d20 the kernels run ~0.2 ms, so
    CPU time per call decides whether the GPU waits."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, positions, eps, scale):
        _setup_context(ctx, (q, k, cos, sin, positions, eps, scale), None)
        return rope_qknorm_fwd(q, k, cos, sin, positions, eps, *_fresh(q, k), scale)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, cos, sin, positions = ctx.saved_tensors
        dq, dk = rope_qknorm_bwd(grad_q, grad_k, q, k, cos, sin, positions, ctx.eps, *_fresh(q, k), ctx.scale)
        return dq, dk, None, None, None, None, None


def rope_qknorm_triton(q, k, cos, sin, positions=None, eps=1e-6, scale=1.0):
    """Same signature and result as rope_qknorm_reference, through the fused Triton kernels
    (differentiable in q and k; CUDA tensors, or CPU under TRITON_INTERPRET=1). Under torch.compile it
    is the custom op (no graph break); eager calls skip the op's dispatch (see _RopeQKNormEager).

    The first call per (heads, head_dim, positions or not) autotunes: warm up before CUDA graph capture.
    Positions outside the tables are not checked here (that would sync the GPU)."""
    if torch.compiler.is_compiling():
        return _rope_qknorm_op(q, k, cos, sin, positions, eps, float(scale))
    return _RopeQKNormEager.apply(q, k, cos, sin, positions, eps, float(scale))

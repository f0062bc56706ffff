"""Newton-Schulz orthogonalization for Muon, batched over a stack of same-shape matrices.

Muon replaces each 2-D update G by (approximately) its polar factor U V^T, computed with a few steps of an
odd matrix polynomial. We use the Polar Express schedule (Amsel et al., 2025): five steps, each with its own
coefficients (a, b, c), applied to X normalized so that its spectral norm is below 1:

    A = X X^T;   B = b A + c A A;   X = a X + B X

X is taken on its wide side (X^T for a tall input) so that A is the small Gram matrix.

The two products A = X X^T and A A (= A A^T, A being symmetric) give symmetric results, so the Triton
kernel here computes only the tiles on and above the diagonal and writes each one twice (the tile and its
mirror): half the FLOPs of a full GEMM for those two products. The last product has no symmetry to exploit:
the kernel folds `a` into B's diagonal (B' = a I + b A + c A A, in fp32 before rounding to bf16), so
X = B' X is a plain torch.bmm (cuBLAS's batched GEMM, near the tensor-core peak on these shapes). On an H100
torch.baddbmm(X, B, X, beta=a) ran ~1.4x slower than bmm at d20 shapes: with beta != 0 it first copies X
into the output and cuBLAS then reads it back. Folding `a` also rounds B' (~ I near convergence) rather than
B (~ (1 - a) I), so it loses no accuracy.

Public API (same signature and semantics for both):
    newton_schulz_reference(G, steps=5, dtype=torch.bfloat16, safety=NORM_SAFETY)  plain PyTorch, any device
    newton_schulz_triton(G, steps=5, dtype=torch.bfloat16, safety=NORM_SAFETY)     symmetric-product kernel + cuBLAS
`safety` is the factor on the Frobenius norm that X is divided by first (X / (safety * |X|_F + 1e-6)): ours is
1.02; nanochat's current muon_step_fused uses 1.01 (Muon's --ns-safety selects it).
and sym_product_triton(P, Q=None, alpha=1.0, beta=0.0, gamma=0.0, out=None), the kernel itself.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the reference works, the kernel path says what is missing
    triton = None

# Polar Express coefficients (a, b, c) per step, as published and used by nanochat / modded-nanogpt.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# Frobenius norm >= spectral norm; the extra 2% keeps the spectral norm below 1 despite bf16 rounding.
NORM_SAFETY = 1.02
NANOCHAT_NORM_SAFETY = 1.01  # nanochat/optim.py muon_step_fused: X / (X.norm() * 1.01 + 1e-6)
NORM_EPS = 1e-6


def _check(G, steps, safety=NORM_SAFETY):
    if not safety >= 1.0:
        raise ValueError(f"safety must be >= 1 (the Frobenius norm bounds the spectral norm from above), got {safety}")
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices (..., m, n); got a tensor of shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise TypeError(f"newton_schulz needs a floating-point tensor, got {G.dtype}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"steps must be in 1..{len(POLAR_EXPRESS_COEFFS)} (one per Polar Express "
                         f"coefficient triple), got {steps}")


def _normalized(G, dtype, safety=NORM_SAFETY):
    """G as a contiguous (batch, m, n) stack in `dtype`, scaled so that each spectral norm is below 1."""
    X = G.reshape(-1, *G.shape[-2:]).to(dtype)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    # One vectorized multiply in `dtype`; rounding the scale to bf16 (<= 0.4%) stays inside the 2% margin.
    return (X * (1.0 / (norm * safety + NORM_EPS)).to(dtype)).contiguous()


def newton_schulz_reference(G, steps=5, dtype=torch.bfloat16, safety=NORM_SAFETY):
    """Orthogonalize G (..., m, n) with `steps` Polar Express steps computed in `dtype`; returns `dtype`.

    Plain PyTorch (the CPU path and the kernel's test oracle). Muon uses bf16; other dtypes are for testing.
    """
    _check(G, steps, safety)
    if G.numel() == 0:
        return G.to(dtype, copy=True)
    X = _normalized(G, dtype, safety)
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # work on the wide side, so that A is the small Gram matrix
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.contiguous().view(G.shape)


def newton_schulz_triton(G, steps=5, dtype=torch.bfloat16, safety=NORM_SAFETY):
    """Same as newton_schulz_reference, with the two symmetric products done by the Triton kernel."""
    _check(G, steps, safety)
    return torch.ops.fastchat_triton.newton_schulz(G, steps, dtype, float(safety))


@torch.library.custom_op("fastchat_triton::newton_schulz", mutates_args=())
def _newton_schulz_op(G: torch.Tensor, steps: int, dtype: torch.dtype, safety: float = NORM_SAFETY) -> torch.Tensor:
    if G.numel() == 0:
        return G.to(dtype, copy=True)
    X = _normalized(G, dtype, safety)  # our own copy: the ping-pong below may overwrite it
    # A tall stack is never transposed in memory: the kernel reads X^T through its strides, and the
    # update is done transposed, (B X^T)^T = X B (B is symmetric), so X keeps G's layout throughout.
    tall = X.shape[-2] > X.shape[-1]
    m = min(X.shape[-2:])
    A = X.new_empty(X.shape[0], m, m)  # buffers reused across steps
    B = torch.empty_like(A)
    Y = torch.empty_like(X)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        sym_product_triton(X.mT if tall else X, out=A)               # A = X X^T (wide side)
        sym_product_triton(A, Q=A, alpha=c, beta=b, gamma=a, out=B)  # B = c A A^T + b A + a I
        if tall:                                                     # = a X + (b A + c A A) X
            torch.bmm(X, B, out=Y)
        else:
            torch.bmm(B, X, out=Y)
        X, Y = Y, X
    return X.view(G.shape)


@_newton_schulz_op.register_fake
def _(G, steps, dtype, safety=NORM_SAFETY):
    return G.new_empty(G.shape, dtype=dtype)


def sym_product_triton(P, Q=None, alpha=1.0, beta=0.0, gamma=0.0, out=None):
    """C = alpha * P P^T + beta * Q + gamma * I for a stack P (..., m, k), optional symmetric Q (..., m, m).

    Only tiles on and above the diagonal are computed; each is also written to its mirror below the
    diagonal, so C is symmetric (exactly, off the diagonal tiles). Inputs are read in their own dtype
    (bf16 on GPU; fp32/fp16 under the Triton interpreter, which has no bf16), accumulated in fp32, and
    written in out's dtype (default: P's). `out` (..., m, m) may be passed pre-allocated. P may be any
    strided view (e.g. a transpose); loads are fast when either of its last two strides is 1.
    """
    if triton is None:
        raise RuntimeError("sym_product_triton needs Triton: pip install triton (or use newton_schulz_reference)")
    if not P.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("sym_product_triton runs on CUDA tensors; on CPU use newton_schulz_reference "
                           "(or set TRITON_INTERPRET=1 before importing triton, to test the kernel)")
    if P.ndim < 2:
        raise ValueError(f"P must be (..., m, k), got shape {tuple(P.shape)}")
    m, k = P.shape[-2:]
    batch_shape = P.shape[:-2]
    if Q is not None and Q.shape != (*batch_shape, m, m):
        raise ValueError(f"Q must have shape {(*batch_shape, m, m)}, got {tuple(Q.shape)}")
    if out is None:
        out = P.new_empty(*batch_shape, m, m)
    elif out.shape != (*batch_shape, m, m):
        raise ValueError(f"out must have shape {(*batch_shape, m, m)}, got {tuple(out.shape)}")
    P3 = P.reshape(-1, m, k)
    Q3 = P3 if Q is None else Q.reshape(-1, m, m)  # with no Q the kernel never reads it
    C3 = out.view(-1, m, m)
    batch = P3.shape[0]
    if batch == 0 or m == 0:
        return out
    args = (P3, Q3, C3, m, k, *P3.stride(), *Q3.stride(), *C3.stride(), float(alpha), float(beta), float(gamma))
    meta = dict(HAS_Q=Q is not None, DOT_PRECISION="ieee" if P.dtype == torch.float32 else "tf32")
    if P.is_cuda:
        grid = lambda cfg: (_num_upper_tiles(triton.cdiv(m, cfg["BLOCK"])), batch)  # noqa: E731
        _sym_product_tuned[grid](*args, **meta)
    else:  # interpreter: one small tile shape, so that tiny test matrices still span several tiles
        grid = (_num_upper_tiles(triton.cdiv(m, 16)), batch)
        _sym_product_kernel[grid](*args, **meta, BLOCK=16, BLOCK_K=16)
    return out


def _num_upper_tiles(tiles):
    """Tile pairs (i, j) with i <= j in a tiles x tiles grid."""
    return tiles * (tiles + 1) // 2


if triton is not None:
    @triton.jit
    def _sym_product_kernel(P, Q, C, M, K,
                            stride_pb, stride_pm, stride_pk,
                            stride_qb, stride_qm, stride_qn,
                            stride_cb, stride_cm, stride_cn,
                            alpha, beta, gamma,
                            HAS_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program t of axis 0 walks the upper triangle column by column: column j holds tiles
        # (0..j, j) and starts at t = j (j + 1) / 2. Invert that with a float sqrt, then correct by one
        # where fp32 rounding lands next to a triangular number.
        t = tl.program_id(0)
        j = ((tl.sqrt(8.0 * t + 1.0) - 1.0) * 0.5).to(tl.int32)
        j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
        j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
        i = t - j * (j + 1) // 2
        bid = tl.program_id(1).to(tl.int64)  # int64: a stack's total size can pass 2^31 elements

        rows = i * BLOCK + tl.arange(0, BLOCK)
        cols = j * BLOCK + tl.arange(0, BLOCK)
        # Masks, not the usual `rows % M` wrap: P may be a transposed view (unit stride along rows), and
        # a wrap would hide that contiguity from the compiler and cost the 16-byte loads.
        rows_ok = rows < M
        cols_ok = cols < M
        rk = tl.arange(0, BLOCK_K)
        P += bid * stride_pb
        a_ptrs = P + rows[:, None] * stride_pm + rk[None, :] * stride_pk   # P[rows, k]    (BLOCK, BLOCK_K)
        b_ptrs = P + cols[None, :] * stride_pm + rk[:, None] * stride_pk   # P[cols, k]^T  (BLOCK_K, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=rows_ok[:, None] & (rk[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=cols_ok[None, :] & (rk[:, None] < K - k0), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_pk
            b_ptrs += BLOCK_K * stride_pk
        acc = acc * alpha
        mask = rows_ok[:, None] & cols_ok[None, :]
        if HAS_Q:
            q = tl.load(Q + bid * stride_qb + rows[:, None] * stride_qm + cols[None, :] * stride_qn, mask=mask)
            acc += beta * q.to(tl.float32)
        if i == j:
            acc += tl.where(rows[:, None] == cols[None, :], gamma, 0.0)
        out = acc.to(C.dtype.element_ty)

        C += bid * stride_cb
        tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, out, mask=mask)
        if i != j:  # the mirror tile C[cols, rows] = out^T; a diagonal tile is its own mirror
            tl.store(C + cols[:, None] * stride_cm + rows[None, :] * stride_cn, tl.trans(out), mask=tl.trans(mask))

    # Hopper bf16: 128x128 tiles (a d20 1280-wide Gram matrix is 10x10 tiles, 55 computed), 3-4 stages.
    # 64x64 is there for small matrices, where 128-wide tiles would leave most SMs idle.
    _sym_product_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        ],
        key=["M", "K", "HAS_Q", "stride_pm"],  # stride_pm: a transposed view tunes apart
    )(_sym_product_kernel)

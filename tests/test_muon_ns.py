"""Newton-Schulz (Polar Express) for Muon: the symmetric-product kernel and the whole iteration.

On CPU the kernel runs under the Triton interpreter, which has no bf16, so kernel tests work in fp32/fp16;
bf16 is covered by the reference here and by the GPU tests at d20 shapes.
"""
import pytest
import torch
from conftest import tolerance

from fastchat_core.triton_kernels.muon_ns import (
    POLAR_EXPRESS_COEFFS,
    newton_schulz_reference,
    newton_schulz_triton,
    sym_product_triton,
)

def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def random_symmetric(*shape, dtype):
    q = torch.randn(*shape, dtype=torch.float64)
    return ((q + q.mT) / 2).to(dtype)


def polar_factor(G):
    """U V^T from the SVD, in float64: what Newton-Schulz approximates."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


# ---------------------------------------------------------------- the symmetric-product kernel

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37, 53), (53, 37), (2, 1, 20, 33)], ids=str)
@pytest.mark.parametrize("with_q", [False, True], ids=["PPt", "PPt+Q+I"])
@pytest.mark.parametrize("transposed", [False, True], ids=["P", "P=view(Pt.mT)"])
def test_sym_product_matches_float64(shape, dtype, with_q, transposed):
    torch.manual_seed(hash((shape, with_q, transposed)) % 2**31)
    m, k = shape[-2:]
    P = (torch.randn(shape, dtype=torch.float64) / k**0.5).to(dtype)
    if transposed:  # the same values through a strided view: unit stride along m, as for a tall X
        P = P.mT.contiguous().mT
    Q = random_symmetric(*shape[:-2], m, m, dtype=dtype) if with_q else None
    alpha, beta, gamma = (-1.7, 0.6, 2.3) if with_q else (1.3, 0.0, 0.0)
    out = torch.full((*shape[:-2], m, m), float("nan"), dtype=dtype)  # poison: every element must be written

    got = sym_product_triton(P, Q=Q, alpha=alpha, beta=beta, gamma=gamma, out=out)

    assert got is out
    ref = alpha * P.double() @ P.double().mT + gamma * torch.eye(m, dtype=torch.float64)
    if with_q:
        ref += beta * Q.double()
    assert not out.isnan().any(), "some elements of C (upper or mirrored lower triangle) were never written"
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_sym_product_allocates_output_and_follows_input_dtype():
    P = torch.randn(2, 19, 24, dtype=torch.float16)
    C = sym_product_triton(P)
    assert C.shape == (2, 19, 19) and C.dtype == torch.float16
    torch.testing.assert_close(C.double(), P.double() @ P.double().mT, rtol=1e-2, atol=1e-3)


def test_sym_product_rejects_mismatched_shapes():
    P = torch.randn(2, 8, 12)
    with pytest.raises(ValueError, match="Q must have shape"):
        sym_product_triton(P, Q=torch.randn(2, 12, 12))
    with pytest.raises(ValueError, match="out must have shape"):
        sym_product_triton(P, out=torch.empty(8, 8))


# ---------------------------------------------------------------- the full iteration

@pytest.mark.parametrize("shape,steps", [((2, 37, 53), 5), ((2, 53, 37), 5), ((48, 48), 5), ((2, 2, 20, 33), 2)],
                         ids=str)
def test_newton_schulz_triton_matches_reference(shape, steps):
    torch.manual_seed(sum(shape) + steps)
    G = torch.randn(shape)
    # fp32 work dtype (the interpreter has no bf16): same math, so only rounding-order differences remain.
    got = newton_schulz_triton(G, steps, dtype=torch.float32)
    ref = newton_schulz_reference(G, steps, dtype=torch.float32)
    assert got.shape == G.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, ref) < 1e-4


def test_newton_schulz_triton_fp16_work_dtype():
    torch.manual_seed(1)
    G = torch.randn(2, 29, 45)
    got = newton_schulz_triton(G, dtype=torch.float16)
    assert got.dtype == torch.float16
    assert rel_err(got, newton_schulz_reference(G, dtype=torch.float32)) < 2e-2


@pytest.mark.parametrize("impl,dtype", [(newton_schulz_reference, torch.bfloat16), (newton_schulz_triton, torch.float32)],
                         ids=["reference-bf16", "triton-fp32"])
@pytest.mark.parametrize("shape", [(2, 40, 70), (70, 40), (48, 48)], ids=str)
def test_result_is_close_to_polar_factor(impl, dtype, shape):
    """Polar Express maps every singular value into a band around 1, keeping the singular vectors."""
    torch.manual_seed(sum(shape))
    G = torch.randn(shape)
    X = impl(G, dtype=dtype)
    sv = torch.linalg.svdvals(X.double())
    assert sv.min() > 0.5 and sv.max() < 1.3, f"singular values in [{sv.min():.3f}, {sv.max():.3f}]"
    assert rel_err(X, polar_factor(G)) < 0.2


@pytest.mark.parametrize("impl", [newton_schulz_reference, newton_schulz_triton])
def test_tall_input_is_the_transpose_of_the_wide_one(impl):
    """m > n runs on the transpose (so the Gram matrix is n x n): NS(G^T) = NS(G)^T."""
    torch.manual_seed(2)
    G = torch.randn(2, 21, 34)
    tall = impl(G.mT.contiguous(), dtype=torch.float32)
    wide = impl(G, dtype=torch.float32)
    assert tall.shape == (2, 34, 21)
    torch.testing.assert_close(tall, wide.mT, rtol=1e-4, atol=1e-5)


def test_reference_defaults_to_bf16_and_keeps_shape():
    G = torch.randn(2, 3, 12, 20, dtype=torch.float32)
    X = newton_schulz_reference(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16 and X.is_contiguous()


def test_scale_invariance():
    """Normalization first: the result does not depend on the gradient's scale."""
    torch.manual_seed(3)
    G = torch.randn(24, 40)
    small = newton_schulz_reference(G * 1e-2, dtype=torch.float32)
    large = newton_schulz_reference(G * 1e2, dtype=torch.float32)
    assert rel_err(small, large) < 1e-3


def test_empty_stack():
    G = torch.randn(0, 5, 7)
    for impl in (newton_schulz_reference, newton_schulz_triton):
        X = impl(G)
        assert X.shape == G.shape and X.dtype == torch.bfloat16


@pytest.mark.parametrize("impl", [newton_schulz_reference, newton_schulz_triton])
def test_clear_errors(impl):
    with pytest.raises(ValueError, match="steps must be in 1..5"):
        impl(torch.randn(4, 6), steps=len(POLAR_EXPRESS_COEFFS) + 1)
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        impl(torch.randn(6))
    with pytest.raises(TypeError, match="floating-point"):
        impl(torch.ones(4, 6, dtype=torch.int64))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and compile-time tracing of fastchat_triton::newton_schulz."""
    G = torch.randn(2, 5, 9)
    torch.library.opcheck(torch.ops.fastchat_triton.newton_schulz.default, (G, 3, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = newton_schulz_triton(torch.empty(4, 30, 20))
        assert fake.shape == (4, 30, 20) and fake.dtype == torch.bfloat16


# ---------------------------------------------------------------- GPU, d20 shapes, bf16

D20 = [(8, 1280, 1280), (4, 5120, 1280), (4, 1280, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", D20, ids=str)
def test_sym_product_gpu_d20(shape):
    torch.manual_seed(0)
    m, k = min(shape[-2:]), max(shape[-2:])
    P = (torch.randn(shape[0], m, k, device="cuda") / k**0.5).bfloat16()
    Q = random_symmetric(shape[0], m, m, dtype=torch.bfloat16).cuda()
    for q, beta, gamma in ((None, 0.0, 0.0), (Q, -0.8, 3.1)):
        out = torch.full((shape[0], m, m), float("nan"), device="cuda", dtype=torch.bfloat16)
        sym_product_triton(P, Q=q, alpha=1.5, beta=beta, gamma=gamma, out=out)
        ref = 1.5 * P.double() @ P.double().mT + gamma * torch.eye(m, device="cuda", dtype=torch.float64)
        if q is not None:
            ref += beta * q.double()
        assert not out.isnan().any()
        assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", D20, ids=str)
def test_newton_schulz_gpu_d20(shape):
    torch.manual_seed(0)
    G = torch.randn(shape, device="cuda")
    got = newton_schulz_triton(G)
    ref_bf16 = newton_schulz_reference(G)
    ref_fp32 = newton_schulz_reference(G, dtype=torch.float32)
    assert got.shape == G.shape and got.dtype == torch.bfloat16
    # bf16 rounding over 5 steps: the kernel path may differ from fp32 as much as the bf16 reference does.
    assert rel_err(got, ref_fp32) < max(1.5 * rel_err(ref_bf16, ref_fp32), 1e-2)
    sv = torch.linalg.svdvals(got[:2].float())
    # A square Gaussian matrix has singular values down to ~1/n of its largest, below what five steps lift,
    # so there only the bulk of the spectrum is in the band; rectangular ones are well conditioned.
    low = sv.quantile(0.05) if shape[-1] == shape[-2] else sv.min()
    assert low > 0.5 and sv.max() < 1.3


# ---------------------------------------------------------------- the safety factor (nanochat's 1.01)

def polar_express_by_hand(G, steps, safety):
    """The iteration written out in float64 from its description: X = G / (safety * |G|_F + 1e-6) per matrix, on
    the wide side, then X = a X + (b A + c A A) X with A = X X^T for each coefficient triple."""
    X = G.double() / (torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True) * safety + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


@pytest.mark.parametrize("impl", [newton_schulz_reference, newton_schulz_triton], ids=["reference", "triton"])
@pytest.mark.parametrize("shape", [(2, 37, 53), (2, 53, 37)], ids=str)
def test_safety_factor(impl, shape):
    from fastchat_core.triton_kernels.muon_ns import NANOCHAT_NORM_SAFETY, NORM_SAFETY
    assert (NORM_SAFETY, NANOCHAT_NORM_SAFETY) == (1.02, 1.01)
    torch.manual_seed(sum(shape))
    G = torch.randn(shape)
    got = impl(G, 5, dtype=torch.float32, safety=NANOCHAT_NORM_SAFETY)
    assert rel_err(got, polar_express_by_hand(G, 5, 1.01)) < 1e-4
    default = impl(G, 5, dtype=torch.float32)
    assert rel_err(default, polar_express_by_hand(G, 5, 1.02)) < 1e-4
    assert rel_err(got, default) > 1e-4   # the factor really reaches the iteration
    with pytest.raises(ValueError, match="safety"):
        impl(G, 5, dtype=torch.float32, safety=0.5)


def test_custom_op_takes_the_safety_factor():
    G = torch.randn(2, 5, 9)
    torch.library.opcheck(torch.ops.fastchat_triton.newton_schulz.default, (G, 3, torch.float32, 1.01),
                          test_utils=("test_schema", "test_faketensor"))

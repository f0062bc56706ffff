"""Fused QK-norm + rotary: the Triton kernels (interpreted on CPU) against a float64 reference.

The reference itself is checked independently: rotation as complex multiplication by e^{-i*angle}.
"""
import pytest
import torch

from fastchat_core.triton_kernels.rope_qknorm import (
    rope_qknorm_bwd,
    rope_qknorm_fwd,
    rope_qknorm_reference,
    rope_qknorm_triton,
)
from conftest import tolerance

EPS = 1e-6


def tables(n, D, base=10000.0, device="cpu"):
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64, device=device) / D)
    angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ref64(q, k, cos, sin, positions=None):
    return rope_qknorm_reference(q.double(), k.double(), cos.double(), sin.double(), positions, EPS)


def poisoned(*like):
    return [torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device) for x in like]


REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

SHAPES = [  # (B, T, Hq, Hk, D): MQA, GQA with non-power-of-two heads, over 16 heads at the largest D, MHA;
    # odd T (token blocks straddle sequences, the last block is ragged); a D with ragged halves
    (2, 7, 5, 1, 64),
    (1, 9, 6, 3, 128),
    (1, 6, 17, 2, 256),
    (3, 5, 3, 3, 48),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hk,D", SHAPES)
def test_forward_matches_float64_and_reference(B, T, Hq, Hk, D, dtype):
    torch.manual_seed(B * 100 + T * 10 + Hq)
    cos, sin = tables(T + 4, D)
    q = (3 * torch.randn(B, T, Hq, D)).to(dtype)
    k = (0.5 * torch.randn(B, T, Hk, D) + 0.1).to(dtype)
    q_out, k_out = rope_qknorm_fwd(q, k, cos, sin, None, EPS, *poisoned(q, k))
    exp_q, exp_k = ref64(q, k, cos, sin)
    rtol, atol = tolerance(dtype)
    for out, exp, ref in zip((q_out, k_out), (exp_q, exp_k), rope_qknorm_reference(q, k, cos, sin)):
        assert out.dtype == dtype and out.shape == exp.shape
        assert not out.isnan().any(), "kernel left elements unwritten"
        torch.testing.assert_close(out.double(), exp, rtol=rtol, atol=atol)
        assert rel_err(out, exp) < REL[dtype]
        assert rel_err(out, ref) < REL[dtype]


def test_reference_is_norm_then_complex_rotation():
    torch.manual_seed(0)
    T, D = 6, 32
    cos, sin = tables(T, D)
    q, k = torch.randn(2, T, 3, D, dtype=torch.float64), torch.randn(2, T, 1, D, dtype=torch.float64)
    q_out, _ = rope_qknorm_reference(q, k, cos.double(), sin.double(), None, EPS)
    normed = torch.nn.functional.rms_norm(q, (D,), eps=EPS)
    angles = torch.atan2(sin.double(), cos.double())[:, None, :]                 # (T, 1, D/2)
    z = torch.complex(normed[..., : D // 2], normed[..., D // 2:]) * torch.exp(-1j * angles)
    torch.testing.assert_close(q_out, torch.cat([z.real, z.imag], dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hk,D", SHAPES[:3])
def test_backward_matches_float64_autograd(B, T, Hq, Hk, D, dtype):
    torch.manual_seed(7 + T)
    cos, sin = tables(T, D)
    q = (2 * torch.randn(B, T, Hq, D)).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D).to(dtype).requires_grad_()
    gq, gk = torch.randn(B, T, Hq, D).to(dtype), torch.randn(B, T, Hk, D).to(dtype)
    q_out, k_out = rope_qknorm_triton(q, k, cos, sin, None, EPS)
    dq, dk = torch.autograd.grad([q_out, k_out], [q, k], [gq, gk])

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exp_q, exp_k = ref64(q64, k64, cos, sin)
    exp_dq, exp_dk = torch.autograd.grad([exp_q, exp_k], [q64, k64], [gq.double(), gk.double()])
    rtol, atol = tolerance(dtype)
    for got, exp in ((q_out, exp_q), (k_out, exp_k), (dq, exp_dq), (dk, exp_dk)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp.detach(), rtol=rtol, atol=atol)
        assert rel_err(got, exp) < REL[dtype]

    # Same gradients from the raw launch into poisoned buffers: every element is written.
    dq2, dk2 = rope_qknorm_bwd(gq, gk, q.detach(), k.detach(), cos, sin, None, EPS, *poisoned(q, k))
    assert not dq2.isnan().any() and not dk2.isnan().any()
    torch.testing.assert_close(dq2, dq)
    torch.testing.assert_close(dk2, dk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hk,D", SHAPES)
@pytest.mark.parametrize("ragged", [False, True])
def test_qk_scale_folded_in_forward_and_backward(B, T, Hq, Hk, D, dtype, ragged):
    """The model's qk_scale option: out = scale * rotate(rms_norm(x)), against the unscaled float64 reference
    times the scale; the reference's own scale argument agrees."""
    torch.manual_seed(11 + T + D)
    scale = 1.2
    cos, sin = tables(T + 9, D)
    positions = torch.randint(0, T + 9, (B, T)) if ragged else None
    q = (2 * torch.randn(B, T, Hq, D)).to(dtype).requires_grad_()
    k = torch.randn(B, T, Hk, D).to(dtype).requires_grad_()
    gq, gk = torch.randn(B, T, Hq, D).to(dtype), torch.randn(B, T, Hk, D).to(dtype)
    q_out, k_out = rope_qknorm_triton(q, k, cos, sin, positions, EPS, scale)
    dq, dk = torch.autograd.grad([q_out, k_out], [q, k], [gq, gk])
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exp_q, exp_k = (scale * t for t in ref64(q64, k64, cos, sin, positions))
    exp_dq, exp_dk = torch.autograd.grad([exp_q, exp_k], [q64, k64], [gq.double(), gk.double()])
    rtol, atol = tolerance(dtype)
    for got, exp in ((q_out, exp_q), (k_out, exp_k), (dq, exp_dq), (dk, exp_dk)):
        torch.testing.assert_close(got.double(), exp.detach(), rtol=rtol, atol=atol)
    ref_q, ref_k = rope_qknorm_reference(q64, k64, cos.double(), sin.double(), positions, EPS, scale)
    torch.testing.assert_close(ref_q, exp_q)
    torch.testing.assert_close(ref_k, exp_k)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_positions_ragged_batch(pos_dtype):
    torch.manual_seed(3)
    N, Hq, Hk, D, max_T = 11, 5, 1, 64, 40
    cos, sin = tables(max_T, D)
    q, k = torch.randn(N, Hq, D), torch.randn(N, Hk, D)
    positions = torch.randint(0, max_T, (N,), dtype=pos_dtype)
    q_out, k_out = rope_qknorm_fwd(q, k, cos, sin, positions, EPS, *poisoned(q, k))
    exp_q, exp_k = ref64(q, k, cos, sin, positions)
    for out, exp, ref in zip((q_out, k_out), (exp_q, exp_k), rope_qknorm_reference(q, k, cos, sin, positions)):
        assert not out.isnan().any()
        assert rel_err(out, exp) < 1e-5 and rel_err(out, ref) < 1e-5
    # Token t of each sequence at position t is exactly the training (positions=None) layout.
    B, T = 2, 5
    qb, kb = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    pos = torch.arange(T, dtype=pos_dtype).repeat(B, 1)
    with_pos = rope_qknorm_triton(qb, kb, cos, sin, pos, EPS)
    without = rope_qknorm_triton(qb, kb, cos, sin, None, EPS)
    for a, b in zip(with_pos, without):
        torch.testing.assert_close(a, b)


def test_strided_inputs_and_grads():
    """q, k as slices of a fused qkv projection, grads in the (B, H, T, D) layout attention returns."""
    torch.manual_seed(5)
    B, T, Hq, Hk, D = 2, 5, 3, 1, 64
    cos, sin = tables(T, D)
    qkv = torch.randn(B, T, Hq + 2 * Hk, D)
    q, k = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hk]
    assert not q.is_contiguous()
    q_out, k_out = rope_qknorm_fwd(q, k, cos, sin, None, EPS, *poisoned(q, k))
    exp_q, exp_k = ref64(q, k, cos, sin)
    assert rel_err(q_out, exp_q) < 1e-5 and rel_err(k_out, exp_k) < 1e-5

    gq = torch.randn(B, Hq, T, D).transpose(1, 2)
    gk = torch.randn(B, Hk, T, D).transpose(1, 2)
    dq, dk = rope_qknorm_bwd(gq, gk, q, k, cos, sin, None, EPS, *poisoned(q, k))
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    exp_dq, exp_dk = torch.autograd.grad(ref64(q64, k64, cos, sin), [q64, k64], [gq.double(), gk.double()])
    assert rel_err(dq, exp_dq) < 1e-5 and rel_err(dk, exp_dk) < 1e-5


def test_custom_op_opcheck_and_compile():
    torch.manual_seed(1)
    T, D = 3, 32
    cos, sin = tables(T, D)
    q = torch.randn(1, T, 3, D, requires_grad=True)
    k = torch.randn(1, T, 1, D, requires_grad=True)
    torch.library.opcheck(torch.ops.fastchat_triton.rope_qknorm.default, (q, k, cos, sin, None, EPS))

    # fullgraph=True fails on any graph break: the op must trace through its fake impl and autograd.
    compiled = torch.compile(rope_qknorm_triton, backend="aot_eager", fullgraph=True)
    q_out, k_out = compiled(q, k, cos, sin, None, EPS)
    dq, = torch.autograd.grad(q_out.sum() + k_out.square().sum(), [q])
    q_exp, k_exp = rope_qknorm_reference(q, k, cos, sin, None, EPS)
    dq_exp, = torch.autograd.grad(q_exp.sum() + k_exp.square().sum(), [q])
    torch.testing.assert_close(q_out, q_exp)
    torch.testing.assert_close(dq, dq_exp)


@pytest.mark.parametrize("fn", [rope_qknorm_reference, rope_qknorm_triton])
def test_clear_errors(fn):
    cos, sin = tables(4, 64)
    q, k = torch.randn(1, 6, 2, 64), torch.randn(1, 6, 2, 64)
    with pytest.raises(ValueError, match="rotary tables have 4 rows"):
        fn(q, k, cos, sin)
    with pytest.raises(ValueError, match="same even head_dim"):
        fn(q[:, :4], torch.randn(1, 4, 2, 32), cos, sin)
    with pytest.raises(ValueError, match="positions must be"):
        fn(q, k, cos, sin, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="cos and sin must"):
        fn(q[:, :4], k[:, :4], cos[:, :16], sin[:, :16])


# ---------------------------------------------------------------------------------------------------
# On a GPU: the real d20 shapes in bf16.

@pytest.mark.gpu
@pytest.mark.parametrize("Hk", [10, 2])
def test_gpu_d20_bf16_forward_backward(Hk):
    torch.manual_seed(0)
    B, T, Hq, D = 16, 2048, 10, 128
    cos, sin = tables(4 * T, D, device="cuda")
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    q_out, k_out = rope_qknorm_fwd(q.detach(), k.detach(), cos, sin, None, EPS, *poisoned(q, k))
    dq, dk = rope_qknorm_bwd(gq, gk, q.detach(), k.detach(), cos, sin, None, EPS, *poisoned(q, k))

    qf, kf = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    exp_q, exp_k = rope_qknorm_reference(qf, kf, cos, sin, None, EPS)
    exp_dq, exp_dk = torch.autograd.grad([exp_q, exp_k], [qf, kf], [gq.float(), gk.float()])
    rtol, atol = tolerance(torch.bfloat16)
    for got, exp in ((q_out, exp_q), (k_out, exp_k), (dq, exp_dq), (dk, exp_dk)):
        assert got.dtype == torch.bfloat16 and not got.isnan().any()
        torch.testing.assert_close(got.float(), exp.detach(), rtol=rtol, atol=atol)
        assert rel_err(got, exp) < REL[torch.bfloat16]
    # The bf16 reference (what the CPU path computes) agrees too.
    for got, ref in zip((q_out, k_out), rope_qknorm_reference(q, k, cos, sin, None, EPS)):
        assert rel_err(got, ref) < REL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_positions_and_compile():
    torch.manual_seed(1)
    N, Hq, Hk, D = 1000, 10, 10, 128
    cos, sin = tables(8192, D, device="cuda")
    q = torch.randn(N, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(N, Hk, D, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (N,), device="cuda", dtype=torch.int32)
    q_out, k_out = rope_qknorm_fwd(q, k, cos, sin, positions, EPS, *poisoned(q, k))
    exp_q, exp_k = rope_qknorm_reference(q.float(), k.float(), cos, sin, positions, EPS)
    assert rel_err(q_out, exp_q) < REL[torch.bfloat16] and rel_err(k_out, exp_k) < REL[torch.bfloat16]

    compiled = torch.compile(rope_qknorm_triton, fullgraph=True)
    for got, exp in zip(compiled(q, k, cos, sin, positions, EPS), (q_out, k_out)):
        torch.testing.assert_close(got, exp)

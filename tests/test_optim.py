"""Optimizers: Muon's update math, AdamW parity with torch, parameter grouping, schedules, exact resume,
and 2 gloo processes with half the batch each == 1 process with the whole batch."""
import copy
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastchat_core import ops
from fastchat_core.optim import (DistAdamW, Muon, apply_schedules, build_optimizers, lr_multiplier,
                                 muon_momentum)
from fastchat_core.triton_kernels.muon_ns import newton_schulz_reference


def ns_fp32(G, steps):
    """The same Polar Express iteration as ops.newton_schulz, computed in fp32 instead of bf16.

    Tests that compare two computations of one update use it: bf16 rounding turns fp32 summation-order
    differences (e.g. reduce-scatter vs one big batch) into whole-ulp differences of 2**-8 in the update,
    a tolerance loose enough to hide real bugs. In fp32 the comparison can be tight.
    """
    return newton_schulz_reference(G, steps, dtype=torch.float32)


def spectrum_matrix(m, n, cond, gen):
    """A random m x n matrix whose singular values run log-evenly from 1 down to 1 / cond."""
    u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=gen), full_matrices=False)
    return u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), min(m, n))) @ vh


def test_muon_update_is_orthogonal_and_shape_scaled():
    """One step with the real (bf16) Newton-Schulz: whatever the gradient's spectrum, the applied update
    divided by lr * sqrt(max(1, rows / cols)) has singular values near 1."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(m, n, generator=gen)) for m, n in [(32, 16), (16, 32), (24, 24)]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = spectrum_matrix(*p.shape, cond=100.0, gen=gen)
    lr = 0.05
    Muon(params, lr=lr).step()
    for p, p0 in zip(params, before):
        m, n = p.shape
        update = (p0 - p.detach()) / (lr * max(1, m / n) ** 0.5)
        sv = torch.linalg.svdvals(update)
        assert 0.5 < sv.min() and sv.max() < 1.2, (p.shape, sv)
        assert abs(sv.mean() - 1) < 0.1, (p.shape, sv.mean())  # a wrong shape scale would be off by sqrt(2)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_hand_written_loop(monkeypatch, nesterov):
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    gen = torch.Generator().manual_seed(1)
    shapes = [(12, 8), (8, 12), (12, 8), (10, 10)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    lr, mom, wd = 0.03, 0.9, 0.1
    opt = Muon(params, lr=lr, momentum=mom, nesterov=nesterov, weight_decay=wd)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1, 1]  # one group (one NS call) per shape

    want = [p.detach().clone() for p in params]
    bufs = [torch.zeros(s) for s in shapes]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):
            bufs[i] = mom * bufs[i] + (1 - mom) * g
            u = (1 - mom) * g + mom * bufs[i] if nesterov else bufs[i]
            m, n = u.shape
            want[i] = want[i] * (1 - lr * wd) - lr * max(1, m / n) ** 0.5 * ns_fp32(u[None], 5)[0]
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.ones(4))])


def test_missing_gradient_is_a_clear_error():
    p = nn.Parameter(torch.ones(4, 4))
    for opt in (Muon([p]), DistAdamW([p])):
        with pytest.raises(RuntimeError, match="no gradient"):
            opt.step()


def test_dist_adamw_equals_torch_adamw():
    gen = torch.Generator().manual_seed(2)
    shapes = [(6, 4), (5,), ()]
    ours = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [dict(params=ps[:1], lr=1e-2, weight_decay=0.1), dict(params=ps[1:], lr=3e-3, weight_decay=0.0)]
    opt = DistAdamW(groups(ours), betas=(0.8, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(theirs), betas=(0.8, 0.95), eps=1e-8)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


class TinyGPT(nn.Module):
    """The parameter layout build_optimizers expects, at toy size. Across 2 ranks it covers every path:
    three same-shape block matrices (a stack padded to 4), two single matrices (rank 1 owns only padding),
    an embedding and head whose rows split evenly, a vector that splits, and a 0-d scalar that cannot."""

    def __init__(self, vocab=24, dim=16, hidden=32):
        super().__init__()
        self.config = SimpleNamespace(dim=dim)
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(3)]
                                    + [nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)])
        self.gain = nn.Parameter(torch.ones(dim))
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx)
        for lin in self.blocks[:3]:
            x = x + torch.tanh(lin(x))
        x = x + self.blocks[4](F.relu(self.blocks[3](x)))
        logits = self.lm_head(x * self.gain) * self.temperature
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def setup_tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT()
    return model, build_optimizers(model, matrix_lr=0.02, embedding_lr=0.02, unembedding_lr=0.004, scalar_lr=0.01)


def make_batches(n=3, batch=8, seq=6, vocab=24):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(vocab, (batch, seq), generator=gen), torch.randint(vocab, (batch, seq), generator=gen))
            for _ in range(n)]


def train_step(model, optimizers, batch):
    model(*batch).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def snapshot(model, optimizers):
    """Parameters and optimizer state, keyed by parameter name."""
    names = {p: n for n, p in model.named_parameters()}
    state = {names[p]: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
             for opt in optimizers for p, st in opt.state.items()}
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, state=state)


def train_and_resume(batches):
    """Train on `batches`, then check resume: a fresh model and optimizers (other init) loaded from the
    state dicts saved before the last batch must redo that step bit for bit. Returns the final snapshot."""
    model, optimizers = setup_tiny()
    for batch in batches[:-1]:
        train_step(model, optimizers, batch)
    saved = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
    train_step(model, optimizers, batches[-1])

    model2, optimizers2 = setup_tiny(seed=1)
    model2.load_state_dict(saved[0])
    for opt, state in zip(optimizers2, saved[1]):
        opt.load_state_dict(state)
    train_step(model2, optimizers2, batches[-1])
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), f"{name} differs after restoring the optimizer state"
    return snapshot(model, optimizers)


def test_build_optimizers_groups_and_lrs():
    model, (adamw, muon) = setup_tiny()
    assert isinstance(adamw, DistAdamW) and isinstance(muon, Muon)
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert {id(p) for p in muon_params} == {id(p) for p in model.blocks.parameters()}
    scale = (16 / 768) ** -0.5
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in adamw.param_groups}
    assert by_lr == {round(0.004 * scale, 9): {id(model.lm_head.weight)},
                     round(0.02 * scale, 9): {id(model.wte.weight)},
                     0.01: {id(model.gain), id(model.temperature)}}
    for opt in (adamw, muon):
        assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)

    model.stray = nn.Parameter(torch.zeros(3, 3))  # a matrix outside blocks: no silent choice of optimizer
    with pytest.raises(ValueError, match="fits no optimizer group"):
        build_optimizers(model)


def test_build_optimizers_on_the_real_gpt():
    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    model = GPT(ModelConfig(depth=2, vocab_size=64, seq_len=16, dim=64, head_dim=32))
    adamw, muon = build_optimizers(model)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    assert adam_ids == {id(p) for p in model.parameters()} - muon_ids
    assert {id(model.wte.weight), id(model.lm_head.weight)} <= adam_ids


def test_schedules():
    n = 100
    mults = [lr_multiplier(s, n, warmup_steps=10, warmdown_ratio=0.2, final_frac=0.1) for s in range(n + 1)]
    assert mults[0] == pytest.approx(1 / 10) and mults[9] == 1.0
    assert all(a < b for a, b in zip(mults[:10], mults[1:10]))        # warmup rises
    assert set(mults[10:81]) == {1.0}                                   # constant until the last 20 steps
    assert all(a > b for a, b in zip(mults[80:], mults[81:]))           # warmdown falls ...
    assert mults[90] == pytest.approx(0.1 + 0.9 * 0.5) and mults[n] == pytest.approx(0.1)  # ... to final_frac
    assert lr_multiplier(5, 10, warmdown_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="warmdown_ratio"):
        lr_multiplier(0, 10, warmdown_ratio=1.5)

    assert muon_momentum(0) == pytest.approx(0.85) and muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95) and muon_momentum(10_000) == pytest.approx(0.95)

    _, optimizers = setup_tiny()
    mult = apply_schedules(optimizers, 95, n)
    assert mult == pytest.approx(lr_multiplier(95, n))
    for opt in optimizers:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * mult)
    assert all(g["momentum"] == pytest.approx(0.85 + 0.1 * 95 / 300) for g in optimizers[1].param_groups)


def test_single_process_resume_is_exact(monkeypatch):
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    snap = train_and_resume(make_batches())
    assert snap["state"]["wte.weight"]["step"] == 3


def _dist_worker(rank, world, init_file, batches, out_dir):
    torch.set_num_threads(1)  # two ranks share the cores; the shapes are tiny
    ops.newton_schulz = ns_fp32  # a fresh process: the parent's monkeypatch does not reach it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a broken collective fails the test, not hangs it
    try:
        mine = [(idx.chunk(world)[rank], tgt.chunk(world)[rank]) for idx, tgt in batches]
        torch.save(train_and_resume(mine), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path, monkeypatch):
    """2 ranks x 4 sequences == 1 process x 8 sequences, for parameters and for the optimizer state, which
    must be sharded: each matrix's momentum on exactly one rank, embedding/head Adam state split by rows.
    Comparing state also proves the gradients are averaged, not summed: Muon and Adam updates barely
    depend on the gradient's scale, so parameters alone would not show it."""
    batches = make_batches()
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    ref = train_and_resume(batches)
    # spawn, not fork: forking after autograd has started its device threads (on a CUDA machine) is refused.
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "rendezvous"), batches, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for name, want in ref["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-5, atol=1e-6, msg=name)

    model, (adamw, muon) = setup_tiny()
    names = {p: n for n, p in model.named_parameters()}
    matrices = [names[p] for g in muon.param_groups for p in g["params"]]
    for name in matrices:
        owners = [r for r in ranks if name in r["state"]]
        assert len(owners) == 1, f"{name}: momentum on {len(owners)} ranks"
        torch.testing.assert_close(owners[0]["state"][name]["momentum_buffer"],
                                   ref["state"][name]["momentum_buffer"], rtol=1e-5, atol=1e-7, msg=name)
    assert all(any(name in r["state"] for name in matrices) for r in ranks)  # both ranks orthogonalize
    for p in (p for g in adamw.param_groups for p in g["params"]):
        full = ref["state"][names[p]]
        rows = p.size(0) // 2 if p.ndim else None
        for r, shard in enumerate(ranks):
            for key in ("exp_avg", "exp_avg_sq"):
                want = full[key][r * rows:(r + 1) * rows] if rows else full[key]
                torch.testing.assert_close(shard["state"][names[p]][key], want, rtol=1e-5, atol=1e-7,
                                           msg=f"{names[p]} {key} on rank {r}")
    assert ranks[0]["state"]["wte.weight"]["exp_avg"].shape == (12, 16)  # ZeRO-1: half the rows per rank

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
from fastchat_core.optim import (NANOCHAT_RECIPE, DistAdamW, Muon, apply_schedules, batch_lr_scale, build_optimizers,
                                 lr_multiplier, muon_apply, muon_momentum, weight_decay_multiplier, weight_decay_scale)
from fastchat_core.triton_kernels.muon_ns import NORM_SAFETY, newton_schulz_reference


def ns_fp32(G, steps, safety=NORM_SAFETY):
    """The same Polar Express iteration as ops.newton_schulz, computed in fp32 instead of bf16.

    Tests that compare two computations of one update use it: bf16 rounding turns fp32 summation-order
    differences (e.g. reduce-scatter vs one big batch) into whole-ulp differences of 2**-8 in the update,
    a tolerance loose enough to hide real bugs. In fp32 the comparison can be tight.
    """
    return newton_schulz_reference(G, steps, dtype=torch.float32, safety=safety)


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


# every optimizer option on, at nanochat's values (with a weight decay, so that the cautious mask matters)
ALL_OPTIONS = dict(weight_decay=0.1, normuon_beta2=0.9, cautious_wd=True, equilibrate=True, renormalize=True,
                   ns_safety=1.01, head_betas=(0.8, 0.96), head_wd=0.01, embedding_betas=(0.8, 0.995),
                   embedding_wd=0.001, scalar_betas=(0.96, 0.95), scalar_wd=0.05)


def setup_tiny(seed=0, **options):
    torch.manual_seed(seed)
    model = TinyGPT()
    return model, build_optimizers(model, matrix_lr=0.02, embedding_lr=0.02, unembedding_lr=0.004, scalar_lr=0.01,
                                   **options)


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


def train_and_resume(batches, options=None):
    """Train on `batches`, then check resume: a fresh model and optimizers (other init) loaded from the
    state dicts saved before the last batch must redo that step bit for bit. Returns the final snapshot."""
    options = options or {}
    model, optimizers = setup_tiny(**options)
    for batch in batches[:-1]:
        train_step(model, optimizers, batch)
    saved = copy.deepcopy((model.state_dict(), [opt.state_dict() for opt in optimizers]))
    train_step(model, optimizers, batches[-1])

    model2, optimizers2 = setup_tiny(seed=1, **options)
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


def _dist_worker(rank, world, init_file, batches, out_dir, options):
    torch.set_num_threads(1)  # two ranks share the cores; the shapes are tiny
    ops.newton_schulz = ns_fp32  # a fresh process: the parent's monkeypatch does not reach it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a broken collective fails the test, not hangs it
    try:
        mine = [(idx.chunk(world)[rank], tgt.chunk(world)[rank]) for idx, tgt in batches]
        torch.save(train_and_resume(mine, options), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["plain", "all-options"])
def test_two_processes_equal_one_process(tmp_path, monkeypatch, options):
    """2 ranks x 4 sequences == 1 process x 8 sequences, for parameters and for the optimizer state, which
    must be sharded: each matrix's momentum on exactly one rank, embedding/head Adam state split by rows.
    Comparing state also proves the gradients are averaged, not summed: Muon and Adam updates barely
    depend on the gradient's scale, so parameters alone would not show it."""
    batches = make_batches()
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    ref = train_and_resume(batches, options)
    # spawn, not fork: forking after autograd has started its device threads (on a CUDA machine) is refused.
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "rendezvous"), batches, str(tmp_path), options), nprocs=2)
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
        for key in ref["state"][name]:   # momentum, and NorMuon's second moment when on
            torch.testing.assert_close(owners[0]["state"][name][key], ref["state"][name][key], rtol=1e-5,
                                       atol=1e-7, msg=f"{name} {key}")
        assert ("second_momentum_buffer" in owners[0]["state"][name]) == bool(options)
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


# ---- the options (nanochat's current optimizer), against reference maths written here from its description ----

def reference_muon_step(p, g, buf, vbuf, *, lr, mom, wd, beta2, cautious, equilibrate, renormalize, safety):
    """One Muon step on one matrix, nanochat's muon_step_fused order, in plain fp32 maths. Returns (p, buf, vbuf)."""
    m, n = p.shape
    buf = mom * buf + (1 - mom) * g                        # momentum, then Nesterov
    u = (1 - mom) * g + mom * buf
    if equilibrate:                                        # MuonEq: each row to the mean row norm
        u = u * (u.norm() / m ** 0.5) / u.norm(dim=1, keepdim=True).clamp_min(1e-6)
    x = ns_fp32(u[None], 5, safety)[0]                     # Polar Express, X / (safety |X|_F + 1e-6) first
    if renormalize:                                        # Muon+: |X|_F = sqrt(min(m, n))
        x = x * min(m, n) ** 0.5 / x.norm().clamp_min(1e-6)
    if beta2:                                              # NorMuon: per row (tall/square) or column (wide)
        dim = 1 if m >= n else 0
        v = x.square().mean(dim=dim, keepdim=True)
        vbuf = beta2 * vbuf + (1 - beta2) * v
        y = x * vbuf.clamp_min(1e-10).rsqrt()
        x = y * x.norm() / y.norm()
    lr_eff = lr * max(1, m / n) ** 0.5
    if cautious:
        p = p - lr_eff * x - lr_eff * wd * p * (x * p >= 0)
    else:
        p = p * (1 - lr * wd) - lr_eff * x
    return p, buf, vbuf


OPTION_SETS = {
    "all": dict(normuon_beta2=0.9, cautious_wd=True, equilibrate=True, renormalize=True, ns_safety=1.01),
    "normuon": dict(normuon_beta2=0.8),
    "cautious": dict(cautious_wd=True),
    "equilibrate": dict(equilibrate=True),
    "renormalize": dict(renormalize=True),
    "safety": dict(ns_safety=1.01),
}


@pytest.mark.parametrize("name", OPTION_SETS)
def test_muon_options_match_reference_maths(monkeypatch, name):
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    opts = OPTION_SETS[name]
    gen = torch.Generator().manual_seed(5)
    shapes = [(12, 8), (8, 12), (12, 8), (10, 10)]   # tall (two: a stack), wide, square
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    lr, mom, wd = 0.03, 0.9, 0.2
    opt = Muon(params, lr=lr, momentum=mom, weight_decay=wd, **opts)
    want = [p.detach().clone() for p in params]
    bufs = [torch.zeros(s) for s in shapes]
    vbufs = [torch.zeros((s[0], 1) if s[0] >= s[1] else (1, s[1])) for s in shapes]
    ref_opts = dict(beta2=opts.get("normuon_beta2", 0.0), cautious=opts.get("cautious_wd", False),
                    equilibrate=opts.get("equilibrate", False), renormalize=opts.get("renormalize", False),
                    safety=opts.get("ns_safety", NORM_SAFETY))
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            want[i], bufs[i], vbufs[i] = reference_muon_step(want[i], g, bufs[i], vbufs[i], lr=lr, mom=mom, wd=wd,
                                                             **ref_opts)
    for i, (p, w) in enumerate(zip(params, want)):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
        if ref_opts["beta2"]:   # NorMuon's variance estimate is the state
            torch.testing.assert_close(opt.state[p]["second_momentum_buffer"], vbufs[i], rtol=1e-5, atol=1e-7)
        else:
            assert "second_momentum_buffer" not in opt.state[p]


def test_cautious_weight_decay_mask(monkeypatch):
    """With Newton-Schulz replaced by the identity and momentum 0 the update is the gradient: only the weights
    whose sign the update shares decay."""
    monkeypatch.setattr(ops, "newton_schulz", lambda G, steps, safety=NORM_SAFETY: G.clone())
    p = nn.Parameter(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))
    g = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    p.grad = g.clone()
    Muon([p], lr=0.1, momentum=0.0, weight_decay=0.5, cautious_wd=True).step()
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # g * p >= 0
    want = torch.tensor([[1.0, -1.0], [2.0, -2.0]]) * (1 - 0.1 * 0.5 * mask) - 0.1 * g
    torch.testing.assert_close(p.detach(), want)


def test_muon_apply_is_one_fused_pass_when_compiled():
    """The per-element tail compiled (what CUDA runs) equals the eager one, cautious or not."""
    gen = torch.Generator().manual_seed(6)
    compiled = torch.compile(muon_apply, dynamic=False, fullgraph=True)
    for cautious in (False, True):
        p = torch.randn(8, 6, generator=gen)
        u, s = torch.randn(8, 6, generator=gen), torch.rand(8, 1, generator=gen) + 0.5
        a, b = p.clone(), p.clone()
        lr, decay = torch.tensor(0.05), torch.tensor(0.01)
        muon_apply(a, u, s, lr, decay, cautious)
        compiled(b, u, s, lr, decay, cautious)
        torch.testing.assert_close(a, b)
        want = p - 0.05 * u * s - 0.01 * p * ((u * s * p >= 0) if cautious else 1)
        torch.testing.assert_close(a, want)


def test_muon_options_off_by_default_and_old_checkpoints_load():
    p = nn.Parameter(torch.randn(4, 4))
    opt = Muon([p])
    assert all(opt.param_groups[0][k] == v for k, v in Muon.OPTIONS.items())
    old = opt.state_dict()
    for k in Muon.OPTIONS:   # a checkpoint from before the options existed
        del old["param_groups"][0][k]
    opt2 = Muon([p], normuon_beta2=0.9)
    opt2.load_state_dict(old)
    assert opt2.param_groups[0]["normuon_beta2"] == 0.0 and opt2.param_groups[0]["ns_safety"] == NORM_SAFETY
    with pytest.raises(ValueError, match="normuon_beta2"):
        Muon([p], normuon_beta2=1.0)


def test_per_group_adamw_betas_and_weight_decay():
    model, (adamw, muon) = setup_tiny(**ALL_OPTIONS)
    by_param = {id(g["params"][0]): g for g in adamw.param_groups}
    head, emb = by_param[id(model.lm_head.weight)], by_param[id(model.wte.weight)]
    scalars = by_param[id(model.gain)] if id(model.gain) in by_param else by_param[id(model.temperature)]
    assert (head["betas"], head["weight_decay"]) == ((0.8, 0.96), 0.01)
    assert (emb["betas"], emb["weight_decay"]) == ((0.8, 0.995), 0.001)
    assert (scalars["betas"], scalars["weight_decay"]) == ((0.96, 0.95), 0.05)
    assert muon.param_groups[0]["weight_decay"] == 0.1 and muon.param_groups[0]["cautious_wd"]
    # the per-group values are what the step uses: the same as torch's AdamW given the same groups
    ref_model = copy.deepcopy(model)
    groups = [dict(params=[dict(ref_model.named_parameters())[n] for n, p in model.named_parameters()
                           if any(p is q for q in g["params"])], lr=g["lr"], betas=g["betas"],
                   weight_decay=g["weight_decay"]) for g in adamw.param_groups]
    ref = torch.optim.AdamW(groups, eps=1e-10)
    batch = make_batches(1)[0]
    model(*batch).backward()
    ref_model(*batch).backward()
    adamw.step()
    ref.step()
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        if not name.startswith("blocks"):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_nanochat_schedules_at_chosen_steps():
    """nanochat's base_train get_lr_multiplier / get_muon_momentum / get_weight_decay, n = 1000 steps."""
    r = NANOCHAT_RECIPE
    n, sched = 1000, dict(warmup_steps=r["warmup_steps"], warmdown_ratio=r["warmdown_ratio"],
                          final_frac=r["final_lr_frac"])
    lr = {s: lr_multiplier(s, n, **sched) for s in (0, 39, 40, 350, 675, 1000)}
    assert lr[0] == pytest.approx(1 / 40) and lr[39] == lr[40] == lr[350] == 1.0   # warmdown starts after 350
    assert lr[675] == pytest.approx(0.5 + 0.5 * 0.05) and lr[1000] == pytest.approx(0.05)
    mom = dict(start=0.85, end=0.97, ramp_steps=400, warmdown_end=0.90)
    m = {s: muon_momentum(s, **mom, num_steps=n, warmdown_ratio=0.65) for s in (0, 200, 350, 400, 675, 999)}
    assert m[0] == pytest.approx(0.85) and m[200] == pytest.approx(0.91)
    assert m[350] == pytest.approx(0.85 + 0.12 * 350 / 400)   # the ramp comes first
    assert m[400] == pytest.approx(0.97 * (1 - 50 / 650) + 0.90 * 50 / 650)
    assert m[675] == pytest.approx(0.935) and m[999] == pytest.approx(0.97 * (1 / 650) + 0.90 * (649 / 650))
    assert muon_momentum(500, **mom) == pytest.approx(0.97)   # no warmdown given: stays at end
    assert [weight_decay_multiplier(s, n, "cosine") for s in (0, 500, 1000)] == pytest.approx([1, 0.5, 0])
    assert weight_decay_multiplier(500, n) == 1.0

    _, optimizers = setup_tiny(**ALL_OPTIONS)
    mult = apply_schedules(optimizers, 675, n, **sched, momentum=mom, wd_schedule="cosine")
    adamw, muon = optimizers
    wd_mult = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0.675))).item()
    for g in muon.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * mult)
        assert g["momentum"] == pytest.approx(0.935) and g["weight_decay"] == pytest.approx(0.1 * wd_mult)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.001, 0.01, 0.05]   # AdamW's: untouched


def test_batch_size_scaling():
    assert batch_lr_scale(2 ** 19) == 1.0 and batch_lr_scale(2 ** 21) == pytest.approx(2.0)
    assert batch_lr_scale(2 ** 17) == pytest.approx(0.5)
    # wd * sqrt(B / 2^19) * D_ref / D, D proportional to the scaling parameters
    assert weight_decay_scale(2 ** 21, 300, 100) == pytest.approx(2 * 100 / 300)

    from fastchat_core.config import ModelConfig
    from fastchat_core.model import GPT
    from fastchat_core.train import base
    cfg = ModelConfig(depth=2, vocab_size=64, seq_len=16)
    model = GPT(cfg)
    args = SimpleNamespace(total_batch_size=2 ** 17, batch_lr_scaling=True, wd_scaling=True)
    lr_scale, wd_scale = base.optim_scales(args, model, cfg)
    ref = ModelConfig(depth=12, vocab_size=64, seq_len=16)   # matmul_params: block matrices + LM head
    assert lr_scale == pytest.approx(0.5)
    assert wd_scale == pytest.approx(0.5 * ref.matmul_params() / cfg.matmul_params())
    assert base.optim_scales(SimpleNamespace(total_batch_size=2 ** 17, batch_lr_scaling=False, wd_scaling=False),
                             model, cfg) == (1.0, 1.0)


def test_optim_recipe_flag():
    from fastchat_core.train import base
    plain = base.get_args([])
    assert (plain.optim_recipe, plain.normuon_beta2, plain.cautious_wd, plain.wd_schedule) == ("fastchat", 0.0,
                                                                                               False, "constant")
    assert plain.ns_safety == NORM_SAFETY and plain.embedding_betas is None and not plain.batch_lr_scaling
    args = base.get_args(["--optim-recipe", "nanochat"])
    for k, v in NANOCHAT_RECIPE.items():
        assert getattr(args, k) == v, k
    for argv in (["--weight-decay=0", "--optim-recipe=nanochat"], ["--optim-recipe=nanochat", "--weight-decay=0"]):
        args = base.get_args(argv + ["--no-cautious-wd", "--embedding-betas=0.9,0.99"])
        assert args.weight_decay == 0.0 and not args.cautious_wd and args.embedding_betas == (0.9, 0.99)
        assert args.normuon_beta2 == 0.9   # the rest still the recipe's

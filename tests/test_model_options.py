"""nanochat's model ingredients as ModelConfig options: all off is the model as it was (against its saved
outputs); each option, and all together, against a plain PyTorch model written here; sliding windows in
training attention, in paged prefill/decode, and through the engine against naive recompute; checkpoints
and the training driver's flags."""
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_run, tiny_gpt
from fastchat_core.attention import PagedBatch, causal_attention, paged_attention_step
from fastchat_core.config import NANOCHAT_RECIPE, ModelConfig, model_options
from fastchat_core.engine import Engine, SamplingParams
from fastchat_core.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
SINGLE = [dict(value_embeds=True), dict(layer_scalars=True), dict(smear=True), dict(backout=True),
          dict(qk_scale=1.2), dict(nanochat_init=True), dict(vocab_multiple=64), dict(rope_base=100_000.0),
          dict(window_pattern="SL")]
ALL = dict(NANOCHAT_RECIPE, window_pattern="SSL")   # depth 3: S S L


def options_gpt(options, depth=3, vocab=97, seq_len=32, n_kv_head=1, noise=0.05, dim=64, head_dim=16):
    """tiny_gpt with ModelConfig options: by default head_dim 16, 4 query heads; windows of 8 tokens at seq_len 32
    (the CUDA decode kernel needs head_dim 64 or 128: the GPU tests pass dim=128, head_dim=64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(depth=depth, vocab_size=vocab, seq_len=seq_len, dim=dim, head_dim=head_dim, n_kv_head=n_kv_head,
                      **options)
    model = GPT(cfg).init_weights(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


# ---- the plain PyTorch model: every option spelled out, nothing shared with model.py or attention.py ----

def ref_windows(cfg):
    """nanochat's rule, restated: S = window_short * seq_len rounded up to 128 unless that reaches seq_len;
    the pattern repeats over the layers; the last layer sees everything."""
    short = math.ceil(cfg.window_short * cfg.seq_len)
    rounded = math.ceil(short / 128) * 128
    short = rounded if rounded < cfg.seq_len else short
    return [None if i == cfg.n_layer - 1 or cfg.window_pattern[i % len(cfg.window_pattern)] == "L" else short
            for i in range(cfg.n_layer)]



def ref_attention(q, k, v, window):
    """(B, T, H, D) q, (B, T, Hk, D) k/v: explicit scores, causal mask cut to `window` tokens back."""
    group = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.size(-1))
    t = torch.arange(q.size(1))
    allowed = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :] <= window) if window is not None else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


def ref_logits(m, idx):
    cfg, P = m.config, dict(m.named_parameters())
    norm = lambda x: x / (x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt()   # noqa: E731
    B, T = idx.shape
    x = norm(P["wte.weight"][idx])
    if cfg.smear:
        gate = P["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ P["smear_gate"])
        x = torch.cat([x[:, :1], x[:, 1:] + gate[..., None] * x[:, :-1]], 1)
    half = cfg.head_dim // 2
    angle = torch.arange(T, dtype=x.dtype)[:, None] * cfg.rope_base ** (-torch.arange(half, dtype=x.dtype) / half)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]

    def rope(t):   # rms-norm then rotate the halves, then the q/k scale
        t = norm(t)
        a, b = t[..., :half], t[..., half:]
        return cfg.qk_scale * torch.cat([a * cos + b * sin, b * cos - a * sin], -1)

    x0, windows, mid = x, ref_windows(cfg), None
    for i in range(cfg.n_layer):
        w = lambda name: P[f"blocks.{i}.{name}.weight"]   # noqa: E731
        if cfg.layer_scalars:
            x = P["resid_lambdas"][i] * x + P["x0_lambdas"][i] * x0
        h = norm(x)
        q = (h @ w("attn.c_q").T).view(B, T, -1, cfg.head_dim)
        k = (h @ w("attn.c_k").T).view(B, T, -1, cfg.head_dim)
        v = (h @ w("attn.c_v").T).view(B, T, -1, cfg.head_dim)
        if cfg.value_embeds and i % 2 == (cfg.n_layer - 1) % 2:
            gate = 3 * torch.sigmoid(h[..., :12] @ w("attn.ve_gate").T)
            v = v + gate[..., None] * w("attn.value_embed")[idx].view_as(v)
        y = ref_attention(rope(q), rope(k), v, windows[i]).reshape(B, T, -1)
        x = x + y @ w("attn.c_proj").T
        x = x + F.relu(norm(x) @ w("mlp.c_fc").T).square() @ w("mlp.c_proj").T
        if i == cfg.n_layer // 2:
            mid = x
    if cfg.backout:
        x = x - P["backout_lambda"] * mid
    logits = norm(x) @ P["lm_head.weight"][:cfg.vocab_size].T
    return cfg.softcap * torch.tanh(logits / cfg.softcap)


@pytest.mark.parametrize("options", SINGLE + [ALL], ids=lambda o: "+".join(o) if len(o) < 3 else "all")
def test_forward_and_backward_match_plain_pytorch(options):
    m = options_gpt(options).double()
    gen = torch.Generator().manual_seed(3)
    idx, tgt = torch.randint(0, 97, (2, 21), generator=gen), torch.randint(0, 97, (2, 21), generator=gen)
    logits = m(idx)
    ref = ref_logits(m, idx)
    torch.testing.assert_close(logits, ref.float())   # the model hands out float32 logits
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(m(idx, tgt), params)
    ref_grads = torch.autograd.grad(F.cross_entropy(ref.flatten(0, 1), tgt.flatten()), params, allow_unused=True)
    for (name, p), g, r in zip(m.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(p) if r is None else r, rtol=1e-6, atol=1e-9, msg=name)
    if "window_pattern" in options:   # the window is shorter than the sequence: the mask matters
        assert m.config.windows()[0] == 8 < idx.size(1)


def test_all_options_off_is_the_model_before_the_options():
    """The outputs of the code before the options existed (tests/model_before_options.json), same seeds."""
    saved = json.loads((Path(__file__).parent / "model_before_options.json").read_text())
    m = tiny_gpt(97, depth=3, n_kv_head=1, seq_len=32, head_dim=16, dim=64).double()
    gen = torch.Generator().manual_seed(5)
    idx, tgt = torch.randint(0, 97, (2, 19), generator=gen), torch.randint(0, 97, (2, 19), generator=gen)
    logits, loss = m(idx), m(idx, tgt)
    loss.backward()
    summ = lambda t: [t.double().sum().item(), t.double().norm().item()]   # noqa: E731
    close = lambda a, b: torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-10, atol=1e-10)   # noqa: E731
    close([summ(r) for r in logits.detach().flatten(0, 1)], saved["logits_rows"])
    close(loss.item(), saved["loss"])
    assert set(m.state_dict()) == set(saved["state"])   # the same parameters: old checkpoints load
    close([summ(v) for v in m.state_dict().values()], [saved["state"][k] for k in m.state_dict()])
    close([summ(p.grad) for _, p in m.named_parameters()], [saved["grads"][k] for k, _ in m.named_parameters()])
    m32 = tiny_gpt(97, depth=3, n_kv_head=1, seq_len=32, head_dim=16, dim=64)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    out = Engine(m32, block_size=4).generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    assert [r.token_ids for r in out] == saved["engine"]


def test_windows_sizes_and_param_counts():
    d20 = ModelConfig(depth=20, window_pattern="SSSL")
    assert d20.windows() == [512, 512, 512, None] * 5   # nanochat: 2048 -> 512
    assert ModelConfig(depth=3, seq_len=32, window_pattern="S").windows() == [8, 8, None]   # 128 would not fit
    assert ModelConfig(depth=2).windows() == [None, None]
    assert ModelConfig(depth=20, **NANOCHAT_RECIPE).flops_per_token() < ModelConfig(depth=20).flops_per_token()
    assert ModelConfig(depth=1, vocab_size=97, vocab_multiple=64).padded_vocab == 128
    with pytest.raises(ValueError, match="window_pattern"):
        ModelConfig(window_pattern="SX")
    for options in SINGLE + [ALL]:
        m = options_gpt(options)
        assert m.num_params() == m.config.num_params(), options


def test_every_parameter_has_an_optimizer_group():
    from fastchat_core.optim import build_optimizers
    m = options_gpt(ALL)
    grouped = {id(p) for opt in build_optimizers(m) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in m.parameters()}


# ---- sliding windows: training attention and the engine's paged attention ----

@pytest.mark.parametrize("window", [0, 3, 9, 40])
def test_windowed_training_attention_matches_dense_masked(window):
    gen = torch.Generator().manual_seed(window)
    q, k, v = torch.randn(2, 23, 4, 16, generator=gen), torch.randn(2, 23, 2, 16, generator=gen), torch.randn(2, 23, 2, 16, generator=gen)
    torch.testing.assert_close(causal_attention(q, k, v, window), ref_attention(q, k, v, window))


@pytest.mark.parametrize("window", [2, 5, 100])
def test_windowed_paged_prefill_and_decode_match_dense_masked(window):
    """Three sequences in blocks of 4, one prefilled with a cached prefix, then decoded a token each: every
    output equals dense attention over the whole sequence with the window's mask."""
    gen = torch.Generator().manual_seed(window)
    lens, cached, Hq, Hk, D, bs = [11, 6, 9], [0, 0, 5], 4, 2, 16, 4
    seqs = [[torch.randn(n + 1, H, D, generator=gen) for H in (Hq, Hk, Hk)] for n in lens]
    k_cache, v_cache = torch.zeros(20, bs, Hk, D), torch.zeros(20, bs, Hk, D)
    tables = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0], [6, 7, 8, 0]], dtype=torch.int32)
    slot = lambda b, p: int(tables[b, p // bs]) * bs + p % bs   # noqa: E731
    # the cached prefix of sequence 2, written as an earlier step would have
    prefix = PagedBatch(True, torch.tensor([slot(2, p) for p in range(cached[2])]), tables[2:], torch.tensor([cached[2]], dtype=torch.int32),
                        [cached[2]], [cached[2]])
    paged_attention_step(*(t[:cached[2]] for t in seqs[2]), k_cache, v_cache, prefix, window)
    new = [range(c, n) for c, n in zip(cached, lens)]
    pack = lambda j, rows: torch.cat([seqs[b][j][list(r)] for b, r in enumerate(rows)])   # noqa: E731
    batch = PagedBatch(True, torch.tensor([slot(b, p) for b, r in enumerate(new) for p in r]), tables,
                       torch.tensor(lens, dtype=torch.int32), [len(r) for r in new], list(lens))
    prefill = paged_attention_step(pack(0, new), pack(1, new), pack(2, new), k_cache, v_cache, batch, window)
    last = [range(n, n + 1) for n in lens]
    batch = PagedBatch(False, torch.tensor([slot(b, n) for b, n in enumerate(lens)]), tables,
                       torch.tensor([n + 1 for n in lens], dtype=torch.int32))
    decode = paged_attention_step(pack(0, last), pack(1, last), pack(2, last), k_cache, v_cache, batch, window)
    start = 0
    for b, (c, n) in enumerate(zip(cached, lens)):
        dense = ref_attention(*(t[None] for t in seqs[b]), window)[0]
        torch.testing.assert_close(prefill[start:start + n - c], dense[c:n])
        torch.testing.assert_close(decode[b], dense[n])
        start += n - c


@pytest.mark.parametrize("kwargs", [
    dict(block_size=4),
    dict(block_size=4, num_blocks=15, max_num_batched_tokens=6, max_num_seqs=3),   # chunked prefill + preemption
], ids=["plain", "chunked+preempt"])
@pytest.mark.parametrize("options", [dict(window_pattern="S", value_embeds=True), ALL], ids=["windows+ve", "all"])
def test_engine_greedy_equals_naive_recompute(options, kwargs):
    m = options_gpt(options, depth=3, vocab=128, seq_len=32)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (1, 5, 17, 30, 3)]
    results = Engine(m, **kwargs).generate(prompts, GREEDY)
    for prompt, r in zip(prompts, results):
        assert r.token_ids == list(m.generate(prompt, GREEDY.max_tokens)), prompt


# ---- checkpoints and flags ----

def test_checkpoint_records_options_and_old_configs_load_with_them_off(tmp_path):
    from fastchat_core.checkpoint import load_model
    m = options_gpt(ALL)
    save_tiny_run(tmp_path, m)
    loaded, meta = load_model(tmp_path)
    assert loaded.config == m.config and meta["model_config"]["window_pattern"] == "SSL"
    idx = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(loaded(idx), m(idx))
    options = {f.name for f in fields(ModelConfig) if "help" in f.metadata} - {"rope_base"}
    old = {k: v for k, v in m.config.to_dict().items() if k not in options}
    assert ModelConfig(**old) == replace(m.config, **{f.name: f.default for f in fields(ModelConfig) if f.name in options})


def test_driver_flags_select_the_options():
    from fastchat_core.train.base import get_args
    assert model_options(get_args([])) == {}
    recipe = model_options(get_args(["--recipe", "nanochat", "--no-smear", "--window-pattern", "SL"]))
    assert recipe == dict(NANOCHAT_RECIPE, smear=False, window_pattern="SL")
    assert model_options(get_args(["--qk-scale", "1.2", "--value-embeds"])) == dict(qk_scale=1.2, value_embeds=True)


# ---- CUDA: FlexAttention and the varlen/decode window paths against the masked reference ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_windowed_attention_matches_masked_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1024, H, 128, generator=gen) for H in (8, 2, 2))
    for window in (127, 255):
        q_, k_, v_ = (t.cuda().to(dtype).requires_grad_() for t in (q, k, v))
        y = causal_attention(q_, k_, v_, window)
        ref = ref_attention(q.double(), k.double(), v.double(), window)
        torch.testing.assert_close(y.double().cpu(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-3,
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-3)
        y.sum().backward()   # and it trains
        assert torch.isfinite(q_.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_engine_with_windows_matches_naive(dtype):
    m = options_gpt(ALL, depth=3, vocab=128, seq_len=64, n_kv_head=1, dim=128, head_dim=64).cuda()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (1, 5, 40, 70)]
    m = m.to(dtype)
    results = Engine(m, block_size=16).generate(prompts, GREEDY)
    naive = [list(m.generate(p, GREEDY.max_tokens)) for p in prompts]
    agree = sum(r.token_ids == n for r, n in zip(results, naive))
    assert agree == len(prompts) if dtype == torch.float32 else agree >= len(prompts) - 1

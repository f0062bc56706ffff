"""The GPT model: sizes, shapes, attention variants, loss semantics, naive generation."""
import pytest
import torch
import torch.nn.functional as F

from fastchat_core.config import ModelConfig
from fastchat_core.model import GPT, rms_norm


def tiny(depth=2, n_kv_head=0, vocab=97, head_dim=32, seq_len=64):
    cfg = ModelConfig(depth=depth, vocab_size=vocab, seq_len=seq_len, dim=64, head_dim=head_dim, n_kv_head=n_kv_head)
    return GPT(cfg).init_weights(seed=1)


def test_config_sizes_match_perf_doc():
    d20, d12 = ModelConfig(depth=20), ModelConfig(depth=12)
    assert (d20.dim, d20.n_head, d12.dim, d12.n_head) == (1280, 10, 768, 6)
    assert ModelConfig(depth=3).dim == 256  # 192 rounded up to a multiple of 128
    assert abs(d20.flops_per_token() / 1e9 - 3.49) < 0.01 and abs(d12.flops_per_token() / 1e9 - 1.04) < 0.01
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(depth=20, n_kv_head=3)


def test_param_count_matches_config():
    for kv in (0, 1):
        m = tiny(n_kv_head=kv)
        assert m.num_params() == m.config.num_params()


@pytest.mark.parametrize("n_kv_head", [0, 1])  # MHA and MQA (2 query heads)
def test_loss_equals_explicit_softcap_ce(n_kv_head):
    torch.manual_seed(0)
    m = tiny(n_kv_head=n_kv_head)
    # perturb the zero-initialized projections so every layer matters
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 97, (3, 17))
    tgt = torch.randint(0, 97, (3, 17))
    tgt[0, :5] = -1
    logits = m(idx)
    assert logits.shape == (3, 17, 97) and logits.abs().max() <= 15.0
    ref = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-1)
    torch.testing.assert_close(m(idx, tgt), ref, rtol=1e-5, atol=1e-5)
    per_tok = m(idx, tgt, reduction="none")
    assert per_tok.shape == tgt.shape and torch.all(per_tok[0, :5] == 0)
    torch.testing.assert_close(per_tok.sum() / (tgt >= 0).sum(), ref, rtol=1e-5, atol=1e-5)


def test_causality():
    torch.manual_seed(0)
    m = tiny()
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    idx = torch.randint(0, 97, (1, 20))
    a = m(idx)
    idx2 = idx.clone()
    idx2[0, 12:] = (idx2[0, 12:] + 1) % 97
    b = m(idx2)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rms_norm_has_no_weights():
    x = torch.randn(4, 64) * 3
    y = rms_norm(x, 1e-6)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), rtol=1e-4, atol=1e-4)


def test_generate_greedy_matches_argmax_and_is_deterministic():
    torch.manual_seed(0)
    m = tiny()
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    prompt = [1, 5, 9]
    out = list(m.generate(prompt, 6))
    ids = prompt + out
    logits = m(torch.tensor([ids]))[0]
    assert out == logits[len(prompt) - 1:-1].argmax(-1).tolist()
    s1 = list(m.generate(prompt, 6, temperature=1.0, top_k=5, seed=3))
    s2 = list(m.generate(prompt, 6, temperature=1.0, top_k=5, seed=3))
    assert s1 == s2

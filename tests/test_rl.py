"""GRPO: the advantage and the clipped loss by hand; GSM8K answer extraction; the reward rising on a toy task;
the engine sampling from the updated weights; 2 ranks == 1 rank; the GSM8K driver end to end (CPU), and its exact
resume after a crash."""
import json
import shutil
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import records, save_tiny_run, tiny_gpt
from fastchat_core import ops
from fastchat_core.checkpoint import CheckpointError, load_model
from fastchat_core.config import ModelConfig
from fastchat_core.model import GPT
from fastchat_core.optim import build_optimizers
from fastchat_core.engine import SamplingParams
from fastchat_core.train import rl
from test_training import assert_same_run, by_step, dies_in_step
from fastchat_core.triton_kernels.muon_ns import newton_schulz_reference

V = 64
TARGET = set(range(10, 18))   # the toy task: reward 1 when the first answer token is one of these 8 of 64
TOY = ["--group-size=8", "--max-new-tokens=2", "--top-k=0", "--device-batch-size=16"]
pytestmark = pytest.mark.usefixtures("one_thread")


def ns_fp32(G, steps, safety=1.02):
    """Muon's Newton-Schulz in fp32: bf16 rounding would hide 1-rank vs 2-rank differences (see test_optim)."""
    return newton_schulz_reference(G, steps, dtype=torch.float32, safety=safety)


def toy_setup(seed=0, n_prompts=8):
    model = GPT(ModelConfig(depth=1, vocab_size=V, seq_len=32, dim=64, head_dim=32)).init_weights(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # away from the zero-init output projections, so attention matters from the start
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    prompts = [torch.randint(0, V, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 20, (n_prompts,), generator=gen)]
    return model, prompts


def toy_reward(i, result):
    return float(result.token_ids[0] in TARGET)


def toy_steps(model, engine, optimizers, prompts, args, steps, offset=0):
    """GRPO steps on the toy task; prompts[i] is question `offset + i` of the step (as a rank's share)."""
    rewards = []
    for step in range(steps):
        seeds = [[rl.sample_seed(0, step, offset + i, j) for j in range(args.group_size)] for i in range(len(prompts))]
        r, _, _ = rl.grpo_step(model, engine, optimizers, prompts, toy_reward, args, seeds)
        rewards.append(r)
    return rewards


def sampled_reward(engine, prompts, n=32, tag="eval"):
    """Mean toy reward over n fresh samples per prompt (seeds the training never used)."""
    params = SamplingParams(max_tokens=1, temperature=1.0)
    groups = rl.rollout(engine, prompts, params, [[rl.sample_seed(tag, i, j) for j in range(n)]
                                                  for i in range(len(prompts))])
    return sum(toy_reward(0, r) for g in groups for r in g) / (n * len(prompts))


# ---- the pieces ------------------------------------------------------------------------------------------

def test_group_advantages():
    rewards = torch.tensor([[0., 0., 1., 1.], [1., 1., 1., 1.], [0., 0., 0., 1.]])
    adv = rl.group_advantages(rewards)
    # binary rewards with success rate p: (1 - p) / sqrt(p (1 - p)) for a success, -p / sqrt(p (1 - p)) otherwise
    torch.testing.assert_close(adv[0], torch.tensor([-1., -1., 1., 1.]), rtol=0, atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))   # all alike: no signal
    torch.testing.assert_close(adv[2], torch.tensor([-1 / 3 ** 0.5] * 3 + [3 ** 0.5]), rtol=0, atol=1e-5)
    plain = rl.group_advantages(rewards, std_norm=False)
    torch.testing.assert_close(plain, torch.tensor([[-.5, -.5, .5, .5], [0.] * 4, [-.25] * 3 + [.75]]))
    assert plain.sum(dim=1).abs().max() < 1e-6


def test_clipped_loss_clips_where_ppo_says():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 9.0], [1.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)   # the ratio-9 tokens are not sampled ones
    old = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    logp = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, clip_frac = rl.clipped_policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    # A > 0: 1.5 clipped to 1.2 (no gradient), 0.5 kept.  A < 0: 1.5 kept (pessimistic), 0.5 clipped to 0.8.
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    # d(-ratio * A)/d logp = -ratio * A, over the 4 sampled tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4, 0.0], [1.5 / 4, 0.0, 0.0]]))
    assert clip_frac.item() == pytest.approx(0.5)

    # ratio 1 (one update per batch): plain policy gradient -A / num_tokens per sampled token
    logp = old.clone().requires_grad_()
    loss, clip_frac = rl.clipped_policy_loss(logp, old, adv, mask, eps, num_tokens=8.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and clip_frac.item() == 0.0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 8, -1 / 8, 0.0], [1 / 8, 1 / 8, 0.0]]))


def test_tool_output_is_not_trained():
    tool_ids = (1, 2, 3, 4)   # python_start, python_end, output_start, output_end
    tokens = [10, 1, 11, 2, 3, 12, 4, 13, 5]
    assert rl.sampled_mask(tokens, tool_ids) == [1, 1, 1, 1, 0, 0, 0, 1, 1]
    assert rl.sampled_mask([10, 1, 11, 2, 3, 12], tool_ids) == [1, 1, 1, 1, 0, 0]   # cut inside the output
    assert rl.sampled_mask(tokens, None) == [1] * len(tokens)
    inputs, targets = rl.training_row([7, 8, 9], tokens, tool_ids)
    assert inputs == [7, 8, 9] + tokens[:-1]
    assert targets == [-1, -1, 10, 1, 11, 2, -1, -1, -1, 13, 5]


def test_gsm8k_questions_and_reward(data_dir):
    questions, golds = rl.load_gsm8k("test")
    assert len(questions) == len(golds) == records(data_dir, "gsm8k", "test.jsonl.gz")   # 1319: test_full_data
    assert all(isinstance(q, str) and q for q in questions)
    assert all(isinstance(float(g), float) for g in golds)   # every gold answer is a number
    assert rl.load_gsm8k("train", 3)[1] == ["72", "10", "5"]   # "#### 72" etc. ends the first 3 solutions
    assert rl.gsm8k_reward("48 / 2 = 24, 48 + 24 = 72\n#### 72", "72") == 1.0
    assert rl.gsm8k_reward("#### 1,234", "1234") == 1.0 and rl.gsm8k_reward("#### 72.0", "72") == 1.0
    assert rl.gsm8k_reward("#### 720", "72") == 0.0
    assert rl.gsm8k_reward("the answer is 72", "72") == 0.0   # no "####": no answer


# ---- learning ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ppo_epochs", [1, 2])
def test_grpo_raises_the_reward_on_a_toy_task(ppo_epochs):
    model, prompts = toy_setup()
    args = rl.get_args(TOY + [f"--ppo-epochs={ppo_epochs}"])
    engine = rl.make_engine(model, None, len(prompts) * 32, 24)
    before = sampled_reward(engine, prompts)
    assert before < 0.3   # about 8/64 for a near-uniform random model
    optimizers = build_optimizers(model, matrix_lr=0.005, embedding_lr=0.05, unembedding_lr=0.001)
    rewards = toy_steps(model, engine, optimizers, prompts, args, steps=20)
    after = sampled_reward(engine, prompts)
    assert after > before + 0.4, (before, after, [r.mean().item() for r in rewards])
    assert rewards[-1].mean() > rewards[0].mean() + 0.3


def test_engine_samples_from_the_updated_weights():
    """After updates the RL engine's greedy answers equal full-recompute decoding with the new weights,
    for prompts longer than a KV block (a stale prefix cache would serve K/V of the old weights)."""
    model, prompts = toy_setup(seed=1)
    long_prompts = [p + p for p in prompts if len(p + p) > 16][:4]
    assert long_prompts
    engine = rl.make_engine(model, None, 64, 64)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    first = engine.generate(long_prompts, greedy)
    assert [r.token_ids for r in first] == [list(model.generate(p, 8)) for p in long_prompts]
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    toy_steps(model, engine, optimizers, prompts, rl.get_args(TOY), steps=4)
    naive = [list(model.generate(p, 8)) for p in long_prompts]
    assert [r.token_ids for r in engine.generate(long_prompts, greedy)] == naive
    assert naive != [r.token_ids for r in first]   # the weights did change


def test_rollout_groups_share_their_prompt_and_start_cold():
    """The G answers to a question share its prompt's K/V; each rollout starts from an empty prefix cache
    (the weights may have changed since the last one)."""
    model, prompts = toy_setup(seed=2)
    long_prompts = [(p * 20)[:70] for p in prompts[:3]]   # 4 full blocks of 16 before the last token
    engine = rl.make_engine(model, None, 64, 80)
    params = SamplingParams(max_tokens=4, temperature=1.0)
    seeds = [[rl.sample_seed(9, i, j) for j in range(4)] for i in range(len(long_prompts))]
    for _ in range(2):
        for group in rl.rollout(engine, long_prompts, params, seeds):
            assert group[0].num_cached_tokens == 0
            assert [r.num_cached_tokens for r in group[1:]] == [64] * 3


def _dist_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    ops.newton_schulz = ns_fp32   # a fresh process: the parent's monkeypatch does not reach it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(two_rank_run(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_rank_run(rank, world):
    """3 toy GRPO steps, this rank taking its half of the questions, then one update on hand-made answers of
    unequal lengths per rank (so the token normalization across ranks matters)."""
    model, prompts = toy_setup(seed=2)
    share = len(prompts) // world
    mine = prompts[rank * share:(rank + 1) * share]
    args = rl.get_args(TOY)
    engine = rl.make_engine(model, None, len(mine) * args.group_size, 24)
    optimizers = build_optimizers(model, matrix_lr=0.005, embedding_lr=0.05, unembedding_lr=0.001)
    rewards = toy_steps(model, engine, optimizers, mine, args, steps=3, offset=rank * share)
    gen = torch.Generator().manual_seed(3)
    rows = [rl.training_row(p, torch.randint(0, V, (n,), generator=gen).tolist(), None)
            for p, n in zip(prompts, [1, 2, 3, 9, 1, 1, 2, 1])]
    advantages = torch.randn(len(rows), generator=gen)
    k = len(rows) // world
    rl.policy_update(model, optimizers, rows[rank * k:(rank + 1) * k], advantages[rank * k:(rank + 1) * k], args)
    head_state = optimizers[0].state[model.lm_head.weight]["exp_avg"]   # scale-sensitive, unlike the params
    return {"rewards": torch.cat(rewards), "params": model.state_dict(), "head_exp_avg": head_state}


def test_two_ranks_equal_one_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "newton_schulz", ns_fp32)
    ref = two_rank_run(0, 1)
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # each rank sampled its own questions, with the same per-question seeds as the single process
    assert torch.equal(torch.stack([r["rewards"].view(3, -1, 8) for r in ranks], 1).flatten(1, 2),
                       ref["rewards"].view(3, -1, 8))
    assert 0 < ref["rewards"].mean() < 1
    for name, want in ref["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-4, atol=1e-6, msg=name)
    rows = V // 2   # the head's Adam state is sharded by rows across the 2 ranks
    for r, shard in enumerate(ranks):
        torch.testing.assert_close(shard["head_exp_avg"], ref["head_exp_avg"][r * rows:(r + 1) * rows],
                                   rtol=1e-4, atol=1e-8)


# ---- the GSM8K driver --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory, tokenizer_file, tok):
    """$FASTCHAT_HOME with a small tokenizer and a tiny random 'SFT' checkpoint."""
    root = tmp_path_factory.mktemp("home")
    (root / "tokenizer").mkdir()
    shutil.copy(tokenizer_file, root / "tokenizer" / "tokenizer.json")
    model = tiny_gpt(tok.vocab_size, seq_len=128, seed=None, init_seed=0, noise=0)
    save_tiny_run(root / "sft" / "d1", model, 5)
    return root


def test_driver_on_gsm8k(home, monkeypatch):
    monkeypatch.setenv("FASTCHAT_HOME", str(home))
    out = rl.main(["--num-steps=2", "--questions-per-step=2", "--group-size=2", "--max-new-tokens=6",
                   "--eval-every=1", "--eval-questions=3", "--device=cpu", "--device-batch-size=3"])
    recs = [json.loads(line) for line in (home / "rl" / "d1" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_pass@2" in r]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and [r["step"] for r in steps] == [1, 2]
    assert all(0 <= r["eval_pass@2"] <= 1 and 0 <= r["eval_reward"] <= r["eval_pass@2"] for r in evals)
    assert all(0 < r["answer_len"] <= 6 and 0 <= r["reward"] <= r["pass@2"] <= 1 for r in steps)
    assert out["steps"] == 2 and out["eval_pass@2"] == evals[-1]["eval_pass@2"] and evals[-1]["step"] == 2
    model, meta = load_model(home / "rl" / "d1")   # the run folder's latest: step 2, from the SFT run
    assert meta["step"] == 2 and meta["init_from"] == str(home / "sft" / "d1" / "step_000005")
    assert model.config.depth == 1


def test_driver_errors(tmp_path, monkeypatch, home):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="no SFT checkpoint"):
        rl.main(["--tokenizer", str(home / "tokenizer" / "tokenizer.json"), "--device=cpu"])
    with pytest.raises(SystemExit):   # argparse: a group of one has no baseline
        rl.get_args(["--group-size=1"])


def test_driver_resumes_exactly_after_a_crash(home, monkeypatch, tmp_path):
    """Killed in step 4 after its step-2 checkpoint, then --resume: the same questions, samples, rewards, losses,
    evaluations and final weights as a run that never stopped."""
    monkeypatch.setenv("FASTCHAT_HOME", str(home))
    # a tiny random model never solves GSM8K: a reward that varies between answers, so that every step learns
    monkeypatch.setattr(rl, "gsm8k_reward", lambda reply, gold: float(sum(map(ord, reply)) % 2))
    flags = ["--num-steps=5", "--questions-per-step=2", "--group-size=4", "--max-new-tokens=6", "--eval-every=2",
             "--eval-questions=2", "--ppo-epochs=2", "--save-every=2", "--device=cpu", "--device-batch-size=4"]
    rl.main(flags + [f"--run-dir={tmp_path / 'ref'}"])
    with dies_in_step(4):
        rl.main(flags + [f"--run-dir={tmp_path / 'run'}"])
    assert (tmp_path / "run" / "latest").read_text() == "step_000002"
    rl.main(flags + [f"--run-dir={tmp_path / 'run'}", "--resume"])
    rewards = by_step(tmp_path / "ref", "reward").values()
    assert 0 < min(rewards) and max(rewards) < 1   # the losses are not zero: the updates moved the weights
    assert_same_run(tmp_path / "ref", tmp_path / "run", ["loss", "reward", "clip_frac", "answer_len", "eval_pass@4",
                                                         "eval_reward"])
    assert json.loads((tmp_path / "run" / "step_000005" / "loader_rank0.json").read_text()) == {"questions_seen": 10}


def test_nanochat_advantage_flag():
    """--no-std-norm gives nanochat's chat_rl advantage: reward minus its group's mean, no division by the std."""
    assert rl.get_args([]).std_norm is True   # default: GRPO's z-score
    args = rl.get_args(["--no-std-norm"])
    assert args.std_norm is False
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    want = torch.stack([row - row.mean() for row in rewards])   # nanochat: mu = rewards.mean(); rewards - mu
    torch.testing.assert_close(rl.group_advantages(rewards, args.std_norm), want)
    # and the optimizer/schedule flags reach RL too, off by default
    assert args.normuon_beta2 == 0.0 and not args.cautious_wd and args.final_lr_frac == 0.0

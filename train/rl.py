"""Reinforcement learning on GSM8K with GRPO: `fastchat train rl` or `torchrun ... -m fastchat_core.train.rl`.

Each step every rank takes its share of the step's questions and samples a group of G answers to each with
the Engine, which runs on the very weights being trained, so the samples are always on-policy. An answer
scores 1 when its final number (after "####") equals the gold one, else 0. Advantages are relative to the
group, (r - mean) / (std + eps) as in GRPO (DeepSeekMath); --no-std-norm gives nanochat's simpler r - mean,
which does not up-weight questions that are almost always or almost never solved. The loss is PPO's clipped
surrogate over the tokens the policy sampled (never the prompt, nor tool output the engine pasted in),
summed and divided by the step's sampled-token count over all ranks. With one update per batch (the
default) the ratio is exactly 1 and this is REINFORCE with a group baseline; with --ppo-epochs > 1 the
batch is reused and the clip bounds how far each extra update moves from the policy that sampled it.

The engine reads the model's parameters in place (the optimizers update them in place, so captured CUDA
graphs stay valid; its concatenated q/k/v copy is refreshed when they change). Its prefix cache is emptied
before each rollout (cached K/V would come from older weights); within a rollout the G answers to a question
share its prompt's K/V (the scheduler holds copies back a step while the first one computes it).

The loop around the steps (progress line, metrics.jsonl, checkpoints with --save-every, exact --resume) is
fastchat_core.training's; the progress line's tok/s counts the answers' sampled tokens.
"""
import argparse
import hashlib
import sys
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist

from fastchat_core.checkpoint import CheckpointError, load_model, newest_checkpoint, resolve_checkpoint
from fastchat_core.cli import run as run_command
from fastchat_core.common import ConfigError, home_dir, is_dist, print0
from fastchat_core.engine import Engine, SamplingParams
from fastchat_core.optim import add_optim_args, build_optimizers, optimizer_options, schedule_options
from fastchat_core.training import Trainer, accumulate, add_loop_args, add_run_args, setup_run, step_optimizers


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="fastchat train rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init-from", default=None, help="SFT checkpoint or run folder (default: the newest "
                   "$FASTCHAT_HOME/sft/d*)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.json (default $FASTCHAT_HOME/tokenizer)")
    g = p.add_argument_group("sampling")
    g.add_argument("--group-size", type=int, default=16, help="answers sampled per question (G; also k of pass@k)")
    g.add_argument("--questions-per-step", type=int, default=16, help="over all ranks")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-steps", type=int, default=-1, help="default: one pass over GSM8K train")
    g.add_argument("--device-batch-size", type=int, default=8, help="sequences per forward/backward")
    g.add_argument("--ppo-epochs", type=int, default=1, help="optimizer updates per sampled batch")
    g.add_argument("--clip-eps", type=float, default=0.2, help="PPO ratio clip")
    g.add_argument("--std-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="divide advantages by the group's std (GRPO); --no-std-norm: r - mean only")
    # 5% of the pretraining rates, as nanochat's RL uses: the SFT model only needs nudging
    add_optim_args(g, matrix_lr=0.001, embedding_lr=0.01, unembedding_lr=0.0002)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=60, help="pass@k on held-out GSM8K test (0 = never)")
    g.add_argument("--eval-questions", type=int, default=200, help="the first N GSM8K test questions")
    add_run_args(g, "default $FASTCHAT_HOME/rl/d<depth>")
    add_loop_args(g)
    args = p.parse_args(argv)
    if args.group_size < 2:
        p.error("--group-size must be >= 2: advantages compare answers within a group")
    if args.ppo_epochs < 1 or args.device_batch_size < 1 or args.questions_per_step < 1:
        p.error("--ppo-epochs, --device-batch-size and --questions-per-step must be >= 1")
    return args


# ---- GSM8K ------------------------------------------------------------------------------------------

def load_gsm8k(split: str, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(questions, gold final answers) of a GSM8K split, the first `limit` items. Only the question is
    rendered, so the tool-call conversion of the reference solutions (fastchat_core.tasks.gsm8k) is skipped."""
    from fastchat_core.tasks.base import read_jsonl
    from fastchat_core.tasks.gsm8k import extract_answer
    rows = read_jsonl("gsm8k", f"{split}.jsonl.gz")[:limit]
    return [r["question"] for r in rows], [extract_answer(r["answer"]) for r in rows]


def gsm8k_reward(reply: str, gold: str) -> float:
    """1 when the number after "####" in the reply equals the gold answer, else 0 (GSM8K's own check)."""
    from fastchat_core.tasks.gsm8k import extract_answer, same_number
    return float(same_number(extract_answer(reply), gold))


# ---- GRPO --------------------------------------------------------------------------------------------

def sample_seed(*parts) -> int:
    """A 63-bit seed named by e.g. (run seed, step, question, sample): the same answer is drawn whatever the
    batch it lands in, so N ranks sample exactly what one rank would."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def group_advantages(rewards: torch.Tensor, std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards (Q, G), one group per row -> advantages (Q, G) relative to the group: r - mean, divided by
    the group's (population) std + eps when std_norm. A group whose answers all score alike gets 0: it says
    nothing about which answer is better."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if std_norm:
        adv = adv / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
    return adv


def clipped_policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2, num_tokens=None):
    """PPO's clipped surrogate -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A), ratio = exp(logp - old_logp),
    summed over the tokens where mask is true and divided by num_tokens (default: their count).

    logp, old_logp, mask: (B, T); advantages: (B,), one per sequence, shared by its tokens. Returns
    (loss, clip fraction): the share of masked tokens where the clipped term won, i.e. whose gradient is cut.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    n = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    loss = -(surrogate * mask).sum() / n
    clipped = ((adv > 0) & (ratio > 1 + clip_eps)) | ((adv < 0) & (ratio < 1 - clip_eps))
    return loss, ((clipped * mask).sum() / mask.sum().clamp(min=1)).detach()


def sampled_mask(tokens, tool_ids) -> list[int]:
    """1 for each token the policy sampled, 0 for tool output the engine pasted in: every token from an
    <|output_start|> through its <|output_end|> (or to the end, when max_tokens cut it). tool_ids is the
    engine's (python_start, python_end, output_start, output_end), None without tools."""
    if tool_ids is None:
        return [1] * len(tokens)
    out_start, out_end = tool_ids[2], tool_ids[3]
    mask, pasted = [], False
    for t in tokens:
        pasted = pasted or t == out_start
        mask.append(0 if pasted else 1)
        pasted = pasted and t != out_end
    return mask


def training_row(prompt, tokens, tool_ids) -> tuple[list[int], list[int]]:
    """(inputs, targets) of prompt + answer for model(inputs, targets): targets are -1 except where the next
    token is one the policy sampled."""
    full = list(prompt) + list(tokens)
    targets = [-1] * (len(prompt) - 1) + [t if m else -1 for t, m in zip(tokens, sampled_mask(tokens, tool_ids))]
    return full[:-1], targets


def make_engine(model, tokenizer, max_num_seqs: int, max_len: int, block_size: int = 16) -> Engine:
    """An engine over `model`'s own parameters with room for max_num_seqs sequences of max_len tokens.
    Prefix caching is on for the groups' shared prompts; rollout() empties it first (the weights changed)."""
    num_blocks = max_num_seqs * -(-max_len // block_size)
    return Engine(model, tokenizer, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                  enable_prefix_caching=True, use_cuda_graphs=True)


def rollout(engine, prompts, params: SamplingParams, seeds):
    """One group of answers (Results) per prompt: answer j to prompts[i] is drawn with seed seeds[i][j].
    Starts from an empty prefix cache: K/V cached by an earlier rollout came from older weights."""
    engine.reset_prefix_cache()
    results = iter(engine.generate([p for p, row in zip(prompts, seeds) for _ in row],
                                   [replace(params, seed=s) for row in seeds for s in row]))
    return [[next(results) for _ in row] for row in seeds]


def _pad(rows, device):
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [0] * (T - len(x)) for x, _ in rows], device=device)
    y = torch.tensor([y + [-1] * (T - len(y)) for _, y in rows], device=device)
    return x, y


def policy_update(model, optimizers, rows, advantages, args, autocast=nullcontext()) -> dict:
    """args.ppo_epochs optimizer updates on the sampled rows [(inputs, targets)] with their advantages (N,).

    The old log-probs are those of the first epoch's forward, i.e. of the weights that sampled the batch.
    The loss is divided by (sampled tokens of the step over all ranks) / world size, as the optimizers
    average gradients across ranks: N ranks then take exactly the step one rank would. Returns
    the last epoch's loss (this rank's part) and clip fraction.
    """
    device = next(model.parameters()).device
    num_tokens = torch.tensor(float(sum(t != -1 for _, y in rows for t in y)), device=device)
    if is_dist():
        dist.all_reduce(num_tokens)
        num_tokens /= dist.get_world_size()
    B = args.device_batch_size
    chunks = [(j, _pad(rows[i:i + B], device), advantages[i:i + B].to(device))
              for j, i in enumerate(range(0, len(rows), B))]
    old = [None] * len(chunks)
    stats = torch.zeros(2, device=device)   # clipped tokens, tokens: on the device, one sync at the end

    def loss_fn(chunk):
        j, (x, y), adv = chunk
        logp = -model(x, y, reduction="none")
        if old[j] is None:
            old[j] = logp.detach()
        mask = y != -1
        loss, clip_frac = clipped_policy_loss(logp, old[j], adv, mask, args.clip_eps, num_tokens)
        n = mask.sum()
        stats[0] += clip_frac.detach() * n
        stats[1] += n
        return loss, loss

    for _ in range(args.ppo_epochs):
        stats.zero_()
        loss_sum = accumulate(chunks, loss_fn, autocast)
        step_optimizers(model, optimizers)
    return {"loss": loss_sum.item(), "clip_frac": (stats[0] / stats[1].clamp(min=1)).item()}


def grpo_step(model, engine, optimizers, prompts, reward_fn, args, seeds, autocast=nullcontext()):
    """Sample, score, update. reward_fn(i, result) scores an answer to prompts[i]; seeds[i][j] draws answer j of
    prompt i. Returns (rewards (Q, G), groups of Results, update stats)."""
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    groups = rollout(engine, prompts, params, seeds)
    rewards = torch.tensor([[reward_fn(i, r) for r in group] for i, group in enumerate(groups)])
    advantages = group_advantages(rewards, args.std_norm).flatten()
    rows = [training_row(p, r.token_ids, engine.tool_ids) for p, group in zip(prompts, groups) for r in group]
    stats = policy_update(model, optimizers, rows, advantages, args, autocast)
    return rewards, groups, stats


# ---- driver ------------------------------------------------------------------------------------------

def _global_sum(values, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.tolist()


def evaluate(engine, prompts, golds, args, rank, world, device, step) -> dict:
    """pass@k (k = group size: a question counts when any of its answers is right) and mean reward over the
    held-out questions, each rank sampling every world-th one."""
    mine = list(range(rank, len(prompts), world))
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    seeds = [[sample_seed(args.seed, "eval", step, i, j) for j in range(args.group_size)] for i in mine]
    groups = rollout(engine, [prompts[i] for i in mine], params, seeds) if mine else []
    scores = [[gsm8k_reward(r.text, golds[i]) for r in group] for i, group in zip(mine, groups)]
    passed, reward, n = _global_sum([sum(max(s) for s in scores), sum(map(sum, scores)), len(scores)], device)
    return {f"eval_pass@{args.group_size}": passed / max(n, 1), "eval_reward": reward / max(n * args.group_size, 1)}


def load_policy(args, device):
    """The SFT checkpoint to start from (--init-from, else the newest $FASTCHAT_HOME/sft run), its model and the
    tokenizer."""
    from fastchat_core.tokenizer import get_tokenizer
    tokenizer = get_tokenizer(args.tokenizer)
    ckpt = resolve_checkpoint(args.init_from) if args.init_from else newest_checkpoint(["sft"])
    if ckpt is None:
        raise CheckpointError(f"no SFT checkpoint under {home_dir() / 'sft'}: run `fastchat train sft` first "
                              "or pass --init-from")
    model, _ = load_model(ckpt, device)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"the checkpoint's vocab ({model.config.vocab_size}) is not the tokenizer's "
                          f"({tokenizer.vocab_size}): pass the --tokenizer it was trained with")
    return ckpt, model, tokenizer


def gsm8k_prompts(tokenizer, split, limit, room):
    """(prompts, gold answers) of a GSM8K split's first `limit` questions, keeping the prompts of at most `room`
    tokens: the others leave no room for an answer within the model's context."""
    questions, golds = load_gsm8k(split, limit)
    prompts = [tokenizer.render_for_completion([{"role": "user", "content": q}]) for q in questions]
    keep = [i for i, p in enumerate(prompts) if len(p) <= room]
    return [prompts[i] for i in keep], [golds[i] for i in keep]


def main(argv=None):
    args = get_args(argv)
    with setup_run(args) as run:   # TF32 on CUDA: the engine samples with the fp32 master weights
        return train(args, run)


def train(args, run):
    """GRPO steps on GSM8K train; the sampling needs no state of its own to resume: answer j to question i of step
    s is drawn with sample_seed(--seed, s, i, j), and the questions are a fixed shuffle read from `questions_seen`."""
    rank, _, world, device = run
    Q, G = args.questions_per_step, args.group_size
    if Q % world:
        raise ConfigError(f"--questions-per-step {Q} does not split over {world} ranks; use a multiple of {world}")
    ckpt, model, tokenizer = load_policy(args, device)
    room = model.max_context - args.max_new_tokens
    train_prompts, train_golds = gsm8k_prompts(tokenizer, "train", None, room)
    eval_prompts, eval_golds = [], []
    if args.eval_every:
        eval_prompts, eval_golds = gsm8k_prompts(tokenizer, "test", args.eval_questions, room)
    if not train_prompts:
        raise ConfigError(f"no GSM8K question fits the context of {model.max_context} tokens with --max-new-tokens "
                          f"{args.max_new_tokens}: lower --max-new-tokens")
    order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    num_steps = args.num_steps if args.num_steps > 0 else max(1, len(train_prompts) // Q)
    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay,
                                  **optimizer_options(args))
    cfg = model.config
    trainer = Trainer(args, run, model, optimizers, args.run_dir or home_dir() / "rl" / f"d{cfg.depth}", num_steps,
                      stage="rl", meta={"model_config": cfg.to_dict(), "args": vars(args), "init_from": str(ckpt)},
                      warmdown_ratio=1.0, **schedule_options(args))   # linear decay (to --final-lr-frac, 0)
    data = {"questions_seen": 0, **(trainer.resume() or {})}
    q_rank = Q // world
    # after resume: the engine reads the weights it restored
    max_len = max(map(len, train_prompts + eval_prompts)) + args.max_new_tokens
    engine = make_engine(model, tokenizer, q_rank * G, max_len)
    autocast = run.autocast()
    print0(f"RL from {ckpt}: depth {cfg.depth}, {model.num_params() / 1e6:.1f}M params; {num_steps} steps of "
           f"{Q} questions x {G} answers over {world} ranks; {len(train_prompts)} train / "
           f"{len(eval_prompts)} eval questions")

    def train_step(step):
        picks = [order[(data["questions_seen"] + rank * q_rank + j) % len(order)] for j in range(q_rank)]
        seeds = [[sample_seed(args.seed, step, i, j) for j in range(G)] for i in picks]
        rewards, groups, stats = grpo_step(model, engine, optimizers, [train_prompts[i] for i in picks],
                                           lambda i, r: gsm8k_reward(r.text, train_golds[picks[i]]), args, seeds,
                                           autocast)
        data["questions_seen"] += Q
        n_tok = sum(len(r.token_ids) for group in groups for r in group)
        reward_sum, passed, n_gen, loss, clip = _global_sum(
            [rewards.sum().item(), (rewards.max(dim=1).values > 0).sum().item(), n_tok, stats["loss"],
             stats["clip_frac"]], device)
        return int(n_gen), {"loss": loss / world, "reward": reward_sum / (Q * G), f"pass@{G}": passed / Q,
                            "answer_len": n_gen / (Q * G), "clip_frac": clip / world}

    def run_eval(step):
        return evaluate(engine, eval_prompts, eval_golds, args, rank, world, device, step)

    return trainer.fit(train_step, lambda: dict(data), run_eval if eval_prompts else None, args.eval_every)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat train rl"))

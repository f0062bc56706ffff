"""Optimizers: Muon for the transformer's matrices, AdamW for embeddings, LM head and scalars.

Both reduce gradients across data-parallel ranks *inside* step(), so the training loop never all-reduces:

- Muon stacks each group of same-shape matrices, reduce-scatters the stack so rank r receives the averaged
  gradients of its slice only, keeps momentum for that slice (the per-rank optimizer state shard),
  orthogonalizes it with one batched Newton-Schulz call, and all-gathers the updated matrices.
- DistAdamW does the same ZeRO-1 style per tensor: reduce-scatter along dim 0, Adam state and update for
  this rank's rows, all-gather. Tensors whose first dim the world size does not divide (scalars, odd
  shapes) are all-reduced and updated whole on every rank: their state is tiny.

All reductions are launched before any update is computed, so communication overlaps the math. With a
single process both are plain Muon / AdamW. state_dict() is per rank (a shard): it restores exactly when
loaded on the same world size.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from fastchat_core import ops
from fastchat_core.common import is_dist, rank, world_size

# torch 2.13 renamed the single-tensor collectives (*_single); older releases only have the old names.
# gloo implements both (reduce-scatter as all-reduce + keep our chunk, since torch 2.3), so CPU runs take
# the same code path as NCCL.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _grad(p, who):
    if p.grad is None:
        # Skipping it would desynchronize the ranks' collectives, so a missing gradient is an error.
        raise RuntimeError(f"{who}: a parameter of shape {tuple(p.shape)} has no gradient; run backward "
                           "through every parameter before step(), or leave frozen ones out of the optimizer")
    return p.grad


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices.

    Each step: buf = lerp(buf, grad, 1 - momentum); g = lerp(grad, buf, momentum) with Nesterov (else buf);
    p *= 1 - lr * weight_decay; p -= lr * sqrt(max(1, rows / cols)) * NS(g).
    The shape scale follows modded-nanogpt / nanochat: rows = weight.size(-2) (out_features of an
    nn.Linear), cols = weight.size(-1); tall matrices take larger steps so that the update's RMS per
    element stays comparable across shapes. Parameters are grouped by shape, one batched NS call per group.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        params = list(params)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.ndim != 2:
                raise ValueError("Muon takes a flat list of 2-D matrices (it makes one group per shape); got "
                                 f"{type(p).__name__ if not isinstance(p, torch.Tensor) else tuple(p.shape)}: "
                                 "give embeddings, vectors and scalars to AdamW")
        shapes = list(dict.fromkeys(p.shape for p in params))  # first-seen order: identical on every rank
        groups = [dict(params=[p for p in params if p.shape == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        world, me = world_size(), rank()
        # 1. Start averaging each group's gradient stack. It is padded with zero matrices to a multiple of
        #    the world size; rank r then owns rows [r * chunk, (r + 1) * chunk) of it.
        launched = []
        for group in self.param_groups:
            grads = [_grad(p, "Muon") for p in group["params"]]
            chunk = -(-len(grads) // world)
            stack = torch.stack(grads + [torch.zeros_like(grads[0])] * (chunk * world - len(grads)))
            if world == 1:
                launched.append((group, stack, stack, None))
                continue
            shard = stack.new_empty(chunk, *stack.shape[1:])
            launched.append((group, stack, shard, _reduce_scatter(shard, stack, async_op=True)))
        # 2. As each reduction lands: update the matrices this rank owns, then start gathering them back.
        #    The gradient stack is dead by then, so it doubles as the gather's output buffer.
        gathers = []
        for group, stack, shard, work in launched:
            if work is not None:
                work.wait()
                shard.div_(world)
            chunk = shard.size(0)
            mine = group["params"][me * chunk:(me + 1) * chunk]
            if mine:
                self._update(group, mine, shard[:len(mine)])
            if world > 1:
                if mine:
                    torch._foreach_copy_(list(shard[:len(mine)].unbind(0)), mine)
                gathers.append((group["params"], stack, _all_gather(stack, shard, async_op=True)))
        # 3. Every rank now takes every matrix from the gathered stack: identical parameters everywhere.
        for params, stack, work in gathers:
            work.wait()
            torch._foreach_copy_(params, list(stack[:len(params)].unbind(0)))

    def _update(self, group, params, g):
        """Momentum, Newton-Schulz and the step for `params`, whose averaged gradients are the stack g.

        g is overwritten. Only these params get momentum state: with several ranks, this rank's shard.
        """
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        rows = list(g.unbind(0))  # views: the foreach ops below write into g
        torch._foreach_lerp_(bufs, rows, 1 - group["momentum"])
        if group["nesterov"]:
            torch._foreach_lerp_(rows, bufs, group["momentum"])
        else:
            torch._foreach_copy_(rows, bufs)
        update = ops.newton_schulz(g, group["ns_steps"]).to(g.dtype)
        m, n = g.shape[-2:]
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * max(1.0, m / n) ** 0.5)


class DistAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay (torch.optim.AdamW's math) and ZeRO-1 sharded state across ranks."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        world, me = world_size(), rank()
        # 1. Start every reduction: reduce-scatter rows where the world size divides dim 0, else all-reduce.
        launched = []
        for group in self.param_groups:
            for p in group["params"]:
                g = _grad(p, "DistAdamW")
                if world == 1:
                    launched.append((group, p, g, None, False))
                elif p.ndim and p.size(0) % world == 0:
                    shard = g.new_empty(p.size(0) // world, *p.shape[1:])
                    launched.append((group, p, shard, _reduce_scatter(shard, g.contiguous(), async_op=True), True))
                else:
                    launched.append((group, p, g, dist.all_reduce(g, async_op=True), False))  # in place
        # 2. Update this rank's rows (or the whole tensor) as each lands; gather sharded tensors back.
        gathers = []
        for group, p, g, work, sharded in launched:
            if work is not None:
                work.wait()
                g.div_(world)
            if sharded:
                rows = p.size(0) // world
                piece = p[me * rows:(me + 1) * rows]
                self._update(group, p, piece, g)
                gathers.append(_all_gather(p, piece.clone(), async_op=True))  # clone: input must not alias p
            else:
                self._update(group, p, p, g)
        for work in gathers:
            work.wait()

    def _update(self, group, p, target, g):
        """One AdamW step on `target` (p or this rank's rows of it) with its averaged gradient g."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        target.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        target.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def add_optim_args(group, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0):
    """The learning-rate flags every training driver shares; defaults differ by stage (RL fine-tunes gently)."""
    group.add_argument("--matrix-lr", type=float, default=matrix_lr, help="Muon, block matrices")
    group.add_argument("--embedding-lr", type=float, default=embedding_lr, help="AdamW, token embedding")
    group.add_argument("--unembedding-lr", type=float, default=unembedding_lr, help="AdamW, LM head")
    group.add_argument("--weight-decay", type=float, default=weight_decay)


def build_optimizers(model, *, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5,
                     weight_decay=0.0, adam_betas=(0.8, 0.95)):
    """[DistAdamW, Muon] for a GPT: Muon takes every 2-D parameter inside model.blocks; AdamW takes the
    embeddings, the LM head and every parameter with fewer than 2 dims, in three groups.

    As nanochat does, the embedding and LM-head learning rates are scaled by (dim / 768) ** -0.5 (they were
    tuned at dim 768); scalar_lr is not. weight_decay (decoupled) applies to both optimizers. Every group
    records its `initial_lr`, which apply_schedules scales.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head_ids = {id(p) for p in model.lm_head.parameters()}
    block_ids = {id(p) for p in model.blocks.parameters()}
    matrices, embeddings, head, scalars = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in head_ids:
            head.append(p)
        elif id(p) in embedding_ids:
            embeddings.append(p)
        elif id(p) in block_ids and p.ndim == 2:
            matrices.append(p)
        elif p.ndim < 2:
            scalars.append(p)
        else:
            raise ValueError(f"parameter {name} of shape {tuple(p.shape)} fits no optimizer group: matrices "
                             "go to Muon only inside model.blocks, embeddings must be nn.Embedding; move it "
                             "or give it a group in build_optimizers")
    scale = (model.config.dim / 768) ** -0.5
    adam_groups = [dict(params=head, lr=unembedding_lr * scale), dict(params=embeddings, lr=embedding_lr * scale),
                   dict(params=scalars, lr=scalar_lr)]
    adamw = DistAdamW([g for g in adam_groups if g["params"]], betas=adam_betas, eps=1e-10,
                      weight_decay=weight_decay)
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, num_steps, warmup_steps=0, warmdown_ratio=0.2, final_frac=0.0):
    """Learning-rate multiplier at `step` of `num_steps`: linear warmup from 1/warmup_steps to 1, constant,
    then a linear warmdown over the last round(warmdown_ratio * num_steps) steps reaching final_frac at
    step == num_steps. Where warmup and warmdown overlap, the smaller wins."""
    if num_steps < 1 or warmup_steps < 0 or not 0 <= warmdown_ratio <= 1:
        raise ValueError(f"need num_steps >= 1, warmup_steps >= 0 and 0 <= warmdown_ratio <= 1; got "
                         f"num_steps={num_steps}, warmup_steps={warmup_steps}, warmdown_ratio={warmdown_ratio}")
    up = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    warmdown_steps = round(warmdown_ratio * num_steps)
    left = min(1.0, max(0.0, (num_steps - step) / warmdown_steps)) if warmdown_steps else 1.0
    return min(up, final_frac + (1 - final_frac) * left)


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    """Muon momentum: linear from `start` to `end` over the first ramp_steps steps (low early: gradients
    change fast at first, so old ones are worth less)."""
    frac = min(step / ramp_steps, 1.0)
    return start + (end - start) * frac


def apply_schedules(optimizers, step, num_steps, warmup_steps=0, warmdown_ratio=0.2, final_frac=0.0):
    """Set every group's lr to initial_lr * lr_multiplier(...) and Muon's momentum; returns the multiplier."""
    mult = lr_multiplier(step, num_steps, warmup_steps, warmdown_ratio, final_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * mult
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum(step)
    return mult

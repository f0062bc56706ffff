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

Options, all off by default (then the maths is exactly the plain Muon / AdamW above), taken from nanochat's current
optimizer (nanochat/optim.py muon_step_fused, MuonAdamW; nanochat/gpt.py setup_optimizer; scripts/base_train.py):
- Muon: MuonEq row equilibration before Newton-Schulz (equilibrate), Muon+ Frobenius renormalization to
  sqrt(min(m, n)) after it (renormalize), NorMuon variance reduction (normuon_beta2 > 0: an EMA of the update's mean
  square per row, or per column for a wide matrix, divides the update, its Frobenius norm kept), cautious weight
  decay (cautious_wd: decay only where the update and the weight agree in sign), the Polar Express safety factor
  (ns_safety, nanochat 1.01). The per-element tail (scales, mask, decay, step) is one pass per matrix, compiled
  with torch.compile on CUDA.
- AdamW: betas and weight decay per group (head, embeddings, scalars).
- Schedules (apply_schedules): LR warmup / warmdown to a final fraction, Muon momentum ramp and warmdown, cosine
  weight decay; the batch-size scaling of learning rates and weight decay is batch_lr_scale / weight_decay_scale.
- NANOCHAT_RECIPE: all of nanochat's base-training constants at once (`--optim-recipe nanochat`).
"""
import argparse
import math
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from fastchat_core import ops
from fastchat_core.common import is_dist, rank, world_size
from fastchat_core.triton_kernels.muon_ns import NANOCHAT_NORM_SAFETY, NORM_SAFETY

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

    # the options, with the values that turn them off (the plain Muon above)
    OPTIONS = dict(normuon_beta2=0.0, cautious_wd=False, equilibrate=False, renormalize=False, ns_safety=NORM_SAFETY)

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 normuon_beta2=0.0, cautious_wd=False, equilibrate=False, renormalize=False, ns_safety=NORM_SAFETY):
        params = list(params)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.ndim != 2:
                raise ValueError("Muon takes a flat list of 2-D matrices (it makes one group per shape); got "
                                 f"{type(p).__name__ if not isinstance(p, torch.Tensor) else tuple(p.shape)}: "
                                 "give embeddings, vectors and scalars to AdamW")
        shapes = list(dict.fromkeys(p.shape for p in params))  # first-seen order: identical on every rank
        groups = [dict(params=[p for p in params if p.shape == s]) for s in shapes]
        if not 0.0 <= normuon_beta2 < 1.0:
            raise ValueError(f"normuon_beta2 must be in [0, 1) (0 = off), got {normuon_beta2}")
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, normuon_beta2=normuon_beta2, cautious_wd=cautious_wd,
                                      equilibrate=equilibrate, renormalize=renormalize, ns_safety=ns_safety))

    def __setstate__(self, state):
        # a checkpoint saved before the options existed restores groups without them: they are off there
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.OPTIONS.items():
                group.setdefault(k, v)

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
        if any(group.get(k, v) != v for k, v in self.OPTIONS.items()):
            return self._update_extended(group, params, g)
        update = ops.newton_schulz(g, group["ns_steps"]).to(g.dtype)
        m, n = g.shape[-2:]
        lr = group["lr"]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * max(1.0, m / n) ** 0.5)

    def _update_extended(self, group, params, g):
        """_update's Newton-Schulz and step with the options on (nanochat's muon_step_fused order): MuonEq
        equilibration, Newton-Schulz (ns_safety), Muon+ renormalization, NorMuon variance reduction, then one pass
        per matrix: p -= lr' * s * U + decay * p [* mask], lr' = lr * sqrt(max(1, m / n)), s the per-row (or column)
        scale of the last two. Weight decay: cautious, nanochat's p * lr' * wd where s * U * p >= 0; else ours,
        p * lr * wd everywhere."""
        m, n = g.shape[-2:]
        if group["equilibrate"]:   # MuonEq: every row rescaled to the mean row norm, |X|_F unchanged
            g32 = g.float()
            target = torch.linalg.vector_norm(g32, dim=(-2, -1), keepdim=True) / m ** 0.5
            rows = torch.linalg.vector_norm(g32, dim=-1, keepdim=True).clamp_min(1e-6)
            g = g * (target / rows).to(g.dtype)
        update = ops.newton_schulz(g, group["ns_steps"], safety=group["ns_safety"])
        # One reduction over U: its mean square along the reduced dim (columns of a tall or square matrix, rows of a
        # wide one); the Frobenius norm and NorMuon's statistics all derive from it.
        red = -1 if m >= n else -2
        size = update.size(red)
        ms = update.float().square().mean(dim=red, keepdim=True)   # (k, m, 1) or (k, 1, n)
        scale = torch.ones_like(ms[..., :1, :1])
        if group["renormalize"]:   # Muon+: |U|_F snapped to sqrt(min(m, n)), a semi-orthogonal matrix's norm
            fro = (ms.sum(dim=(-2, -1), keepdim=True) * size).sqrt().clamp_min(1e-6)
            scale = min(m, n) ** 0.5 / fro
            ms = ms * scale.square()
        beta2 = group["normuon_beta2"]
        if beta2:   # NorMuon: divide by sqrt(EMA of the mean square) per row/column, keeping |U|_F
            bufs = []
            for p in params:
                state = self.state[p]
                if "second_momentum_buffer" not in state:
                    state["second_momentum_buffer"] = p.new_zeros((m, 1) if m >= n else (1, n), dtype=torch.float32)
                bufs.append(state["second_momentum_buffer"])
            torch._foreach_lerp_(bufs, list(ms.unbind(0)), 1 - beta2)
            step = torch.stack(bufs).clamp_min(1e-10).rsqrt()
            v_norm = (ms.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
            v_norm_new = ((ms * size) * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
            scale = scale * step * (v_norm / v_norm_new.clamp_min(1e-10))
        lr = group["lr"] * max(1.0, m / n) ** 0.5
        wd = group["weight_decay"]
        cautious = bool(group["cautious_wd"] and wd)
        decay = lr * wd if cautious else group["lr"] * wd
        apply = muon_apply_compiled if params[0].is_cuda and ops.use_kernel(params[0]) else muon_apply
        lr_t, decay_t = torch.tensor(lr, dtype=torch.float32), torch.tensor(decay, dtype=torch.float32)
        for p, u, s in zip(params, update.unbind(0), scale.unbind(0)):
            apply(p, u, s, lr_t, decay_t, cautious)


def muon_apply(p, u, scale, lr, decay, cautious: bool):
    """The per-element tail of a Muon step on one matrix, in place and in one pass: upd = scale * U (scale (m, 1),
    (1, n) or (1, 1), > 0), p -= lr * upd + decay * p, the decay only where upd * p >= 0 when cautious (cautious
    weight decay: shrink a weight only where the update already pulls it toward zero). lr, decay: 0-d tensors
    (or floats), so that the compiled version does not recompile as they change."""
    upd = u.to(p.dtype) * scale.to(p.dtype)
    shrink = p * (upd * p >= 0) if cautious else p
    p.sub_(lr * upd + decay * shrink)


_compiled = None


def muon_apply_compiled(p, u, scale, lr, decay, cautious: bool):
    """muon_apply as one fused kernel (torch.compile), for CUDA."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(muon_apply, dynamic=False, fullgraph=True)
    return _compiled(p, u, scale, lr, decay, cautious)


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


# nanochat's current base-training optimizer and schedules, every constant from its public source:
# scripts/base_train.py (CLI defaults: embedding 0.3, unembedding 0.008, matrix 0.02, scalar 0.5, weight decay 0.28,
# warmup 40, warmdown 0.65, final LR 0.05; get_muon_momentum 0.85 -> 0.97 over 400 steps, -> 0.90 over the warmdown;
# get_weight_decay cosine to 0; LRs * sqrt(B / 2^19); weight decay * sqrt(B / 2^19) * D_ref / D),
# nanochat/gpt.py setup_optimizer (AdamW betas / weight decay per group; Muon beta2 0.9) and nanochat/optim.py
# muon_step_fused (MuonEq, Polar Express with 1.01, Muon+, NorMuon, cautious weight decay).
NANOCHAT_RECIPE = dict(
    matrix_lr=0.02, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5, weight_decay=0.28,
    normuon_beta2=0.9, cautious_wd=True, muon_equilibrate=True, muon_renormalize=True, ns_safety=NANOCHAT_NORM_SAFETY,
    unembedding_betas=(0.8, 0.96), unembedding_wd=0.01, embedding_betas=(0.8, 0.995), embedding_wd=0.001,
    scalar_betas=(0.8, 0.95), scalar_wd=0.0,
    warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05,
    momentum_start=0.85, momentum_end=0.97, momentum_ramp_steps=400, momentum_warmdown_end=0.90,
    wd_schedule="cosine", batch_lr_scaling=True, wd_scaling=True,
)
RECIPES = {"fastchat": {}, "nanochat": NANOCHAT_RECIPE}
BATCH_REF = 2 ** 19   # nanochat's B_REF: the tokens per step its constants were tuned at (d12)


def _betas(text):
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'beta1,beta2', got {text!r}") from None
    return (b1, b2)


def add_optim_args(group, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0,
                   pretraining=False):
    """The optimizer flags every training driver shares; defaults differ by stage (RL fine-tunes gently). Every
    option defaults to off (today's optimizer). With pretraining, also the batch-size scalings and --optim-recipe
    (whose values the driver applies with set_recipe_defaults before parsing)."""
    group.add_argument("--matrix-lr", type=float, default=matrix_lr, help="Muon, block matrices")
    group.add_argument("--embedding-lr", type=float, default=embedding_lr, help="AdamW, token embedding")
    group.add_argument("--unembedding-lr", type=float, default=unembedding_lr, help="AdamW, LM head")
    group.add_argument("--weight-decay", type=float, default=weight_decay,
                       help="decoupled weight decay (Muon, and AdamW groups without their own --*-wd)")
    group.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW, parameters with fewer than 2 dims")
    for name, what in (("unembedding", "LM head"), ("embedding", "token embedding"), ("scalar", "scalars")):
        group.add_argument(f"--{name}-betas", type=_betas, default=None, metavar="B1,B2",
                           help=f"AdamW betas of the {what} (default 0.8,0.95)")
        group.add_argument(f"--{name}-wd", type=float, default=None,
                           help=f"AdamW weight decay of the {what} (default --weight-decay)")
    group.add_argument("--normuon-beta2", type=float, default=0.0,
                       help="NorMuon variance reduction: EMA beta2 of the per-row/column second moment (0 = off)")
    group.add_argument("--cautious-wd", action=argparse.BooleanOptionalAction, default=False,
                       help="Muon: decay a weight only where the update has its sign (nanochat's p -= lr*wd*p*mask)")
    group.add_argument("--muon-equilibrate", action=argparse.BooleanOptionalAction, default=False,
                       help="Muon: MuonEq row equilibration before Newton-Schulz")
    group.add_argument("--muon-renormalize", action=argparse.BooleanOptionalAction, default=False,
                       help="Muon: Muon+ renormalization of the update's Frobenius norm to sqrt(min(m, n))")
    group.add_argument("--ns-safety", type=float, default=NORM_SAFETY,
                       help=f"Newton-Schulz: divide by this times the Frobenius norm first (nanochat "
                       f"{NANOCHAT_NORM_SAFETY})")
    group.add_argument("--final-lr-frac", type=float, default=0.0, help="the LR multiplier the warmdown ends at")
    group.add_argument("--momentum-start", type=float, default=0.85, help="Muon momentum at step 0")
    group.add_argument("--momentum-end", type=float, default=0.95, help="Muon momentum after the ramp")
    group.add_argument("--momentum-ramp-steps", type=int, default=300, help="steps of the linear momentum ramp")
    group.add_argument("--momentum-warmdown-end", type=float, default=None,
                       help="Muon momentum at the end of the LR warmdown, linear from --momentum-end (default: none)")
    group.add_argument("--wd-schedule", choices=("constant", "cosine"), default="constant",
                       help="Muon weight decay over training: constant, or cosine from --weight-decay to 0")
    if pretraining:
        group.add_argument("--batch-lr-scaling", action=argparse.BooleanOptionalAction, default=False,
                           help=f"scale every LR by sqrt(total batch / {BATCH_REF})")
        group.add_argument("--wd-scaling", action=argparse.BooleanOptionalAction, default=False,
                           help=f"scale the weight decay by sqrt(total batch / {BATCH_REF}) * (d12 reference "
                           "model's scaling params / this model's)")
        group.add_argument("--optim-recipe", choices=sorted(RECIPES), default="fastchat",
                           help="nanochat: its current optimizer and schedules with its constants (NorMuon, "
                           "cautious and cosine weight decay, MuonEq, Muon+, safety 1.01, per-group AdamW, "
                           "warmup 40, warmdown 0.65 to 0.05, momentum 0.85->0.97->0.90, batch scalings); "
                           "flags given explicitly still win")


def set_recipe_defaults(parser, argv=None):
    """Make --optim-recipe's values the parser's defaults, before parse_args, so that explicit flags still win.
    argv: what will be parsed (default sys.argv[1:])."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--optim-recipe", choices=sorted(RECIPES), default="fastchat")
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if RECIPES[known.optim_recipe]:
        parser.set_defaults(**RECIPES[known.optim_recipe])


def optimizer_options(args) -> dict:
    """build_optimizers' options from add_optim_args' flags, learning rates and --weight-decay left out (stages
    scale those)."""
    return dict(scalar_lr=args.scalar_lr,
                head_betas=args.unembedding_betas, head_wd=args.unembedding_wd,
                embedding_betas=args.embedding_betas, embedding_wd=args.embedding_wd,
                scalar_betas=args.scalar_betas, scalar_wd=args.scalar_wd,
                normuon_beta2=args.normuon_beta2, cautious_wd=args.cautious_wd, equilibrate=args.muon_equilibrate,
                renormalize=args.muon_renormalize, ns_safety=args.ns_safety)


def schedule_options(args) -> dict:
    """Trainer's (and apply_schedules') schedule options from add_optim_args' flags."""
    return dict(final_frac=args.final_lr_frac, wd_schedule=args.wd_schedule,
                momentum=dict(start=args.momentum_start, end=args.momentum_end, ramp_steps=args.momentum_ramp_steps,
                              warmdown_end=args.momentum_warmdown_end))


def batch_lr_scale(total_batch_size, ref=BATCH_REF) -> float:
    """sqrt(B / B_ref): nanochat's learning-rate correction for the batch size (AdamW's sqrt rule, used for Muon too)."""
    return (total_batch_size / ref) ** 0.5


def weight_decay_scale(total_batch_size, scaling_params, ref_scaling_params, ref=BATCH_REF) -> float:
    """sqrt(B / B_ref) * D_ref / D (nanochat, after the T_epoch = B / (lr * wd * D) argument, with lr scaled by
    sqrt(B / B_ref)); tokens D are a fixed multiple of the scaling parameters, so D_ref / D is their ratio."""
    return (total_batch_size / ref) ** 0.5 * ref_scaling_params / scaling_params


def scaling_params(model) -> int:
    """Parameters that nanochat's scaling laws count: the block matrices plus the LM head."""
    model = getattr(model, "_orig_mod", model)
    return (sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
            + sum(p.numel() for p in model.lm_head.parameters()))


def build_optimizers(model, *, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5,
                     weight_decay=0.0, adam_betas=(0.8, 0.95), head_betas=None, head_wd=None, embedding_betas=None,
                     embedding_wd=None, scalar_betas=None, scalar_wd=None, normuon_beta2=0.0, cautious_wd=False,
                     equilibrate=False, renormalize=False, ns_safety=NORM_SAFETY):
    """[DistAdamW, Muon] for a GPT: Muon takes every 2-D parameter inside model.blocks; AdamW takes the
    embeddings, the LM head and every parameter with fewer than 2 dims, in three groups.

    As nanochat does, the embedding and LM-head learning rates are scaled by (dim / 768) ** -0.5 (they were
    tuned at dim 768); scalar_lr is not. weight_decay (decoupled) applies to Muon and to every AdamW group without
    its own (*_wd); *_betas override adam_betas per group. The Muon options are Muon's (off by default). Every
    group records its `initial_lr`, which apply_schedules scales.
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
    for group, betas, wd in zip(adam_groups, (head_betas, embedding_betas, scalar_betas), (head_wd, embedding_wd,
                                                                                            scalar_wd)):
        if betas is not None:   # only keys given: a group without them takes the optimizer's defaults
            group["betas"] = tuple(betas)
        if wd is not None:
            group["weight_decay"] = wd
    adamw = DistAdamW([g for g in adam_groups if g["params"]], betas=adam_betas, eps=1e-10,
                      weight_decay=weight_decay)
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, normuon_beta2=normuon_beta2,
                cautious_wd=cautious_wd, equilibrate=equilibrate, renormalize=renormalize, ns_safety=ns_safety)
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


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300, num_steps=None, warmdown_ratio=0.0,
                  warmdown_end=None):
    """Muon momentum: linear from `start` to `end` over the first ramp_steps steps (low early: gradients
    change fast at first, so old ones are worth less). With warmdown_end (nanochat: 0.97 -> 0.90), after the ramp
    it goes linearly from `end` to warmdown_end over the LR warmdown, the last round(warmdown_ratio * num_steps)
    steps (reached at step == num_steps)."""
    if warmdown_end is not None and num_steps and step >= ramp_steps:
        warmdown_steps = round(warmdown_ratio * num_steps)
        start_at = num_steps - warmdown_steps
        if warmdown_steps and step >= start_at:
            progress = (step - start_at) / warmdown_steps
            return end * (1 - progress) + warmdown_end * progress
    frac = min(step / ramp_steps, 1.0)
    return start + (end - start) * frac


def weight_decay_multiplier(step, num_steps, schedule="constant"):
    """The weight decay's multiplier at `step`: 1 (constant), or cosine from 1 at step 0 to 0 at num_steps
    (nanochat's get_weight_decay, Muon only)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / num_steps))
    raise ValueError(f"unknown weight decay schedule {schedule!r}: constant or cosine")


def apply_schedules(optimizers, step, num_steps, warmup_steps=0, warmdown_ratio=0.2, final_frac=0.0,
                    momentum=None, wd_schedule="constant"):
    """Set every group's lr to initial_lr * lr_multiplier(...), Muon's momentum (muon_momentum with the
    `momentum` dict's start/end/ramp_steps/warmdown_end) and, unless constant, Muon's weight decay
    (initial_weight_decay * weight_decay_multiplier); returns the LR multiplier."""
    mult = lr_multiplier(step, num_steps, warmup_steps, warmdown_ratio, final_frac)
    mom = muon_momentum(step, **(momentum or {}), num_steps=num_steps, warmdown_ratio=warmdown_ratio)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * mult
            if isinstance(opt, Muon):
                group["momentum"] = mom
                if wd_schedule != "constant":
                    group["weight_decay"] = (group.setdefault("initial_weight_decay", group["weight_decay"])
                                             * weight_decay_multiplier(step, num_steps, wd_schedule))
    return mult

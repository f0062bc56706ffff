"""The GPT: a nanochat-class dense transformer.

Token embedding -> RMSNorm -> blocks (attention with QK-norm + rotary, ReLU^2 MLP, pre-norm residual)
-> RMSNorm -> untied LM head with a tanh logit softcap. RMSNorm has no weights and no layer has a bias.
The fused parts (rotary + QK-norm, LM head + softcap + cross-entropy) go through fastchat_core.ops,
which picks the Triton kernel on CUDA and the PyTorch reference elsewhere.

nanochat's further ingredients are ModelConfig options, each off by default (off: exactly the model above):
value embeddings (Attention._mix_value), per-layer residual and x0 scalars and backout (GPT._trunk), smear
(GPT._smear), q/k scale (folded into the rope+QK-norm kernel), sliding windows (attention.py), nanochat's
init scales (init_weights), a padded vocabulary (rows past vocab_size are never used).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastchat_core import ops
from fastchat_core.attention import PagedBatch, causal_attention, paged_attention_step
from fastchat_core.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, ModelConfig


def rms_norm(x, eps):
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rotary_tables(seq_len, head_dim, base, device=None):
    """cos/sin tables of shape (seq_len, head_dim // 2), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.dim, cfg.head_dim
        self.c_q = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * hd, d, bias=False)
        self.window = cfg.windows()[layer]
        self.value_embed = self.ve_gate = None
        if layer in cfg.value_embed_layers():
            self.value_embed = nn.Embedding(cfg.padded_vocab, cfg.n_kv_head * hd)
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, cfg.n_kv_head, bias=False)

    def _mix_value(self, x, v, ids):
        """Value residual (ResFormer): v plus an embedding of the token itself, gated per KV head by the input;
        the gate is in (0, 3)."""
        if self.value_embed is None:
            return v
        gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])).unsqueeze(-1)
        return v + gate * self.value_embed(ids).to(v.dtype).view(v.shape)

    def forward(self, x, cos, sin, ids):
        B, T, _ = x.shape
        cfg = self.cfg
        q = self.c_q(x).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x).view(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self._mix_value(x, self.c_v(x).view(B, T, cfg.n_kv_head, cfg.head_dim), ids)
        q, k = ops.rope_qknorm(q, k, cos, sin, None, cfg.norm_eps, cfg.qk_scale)
        y = causal_attention(q, k, v, self.window)
        return self.c_proj(y.reshape(B, T, -1))

    def forward_paged(self, x, ids, positions, cos, sin, batch: PagedBatch, kv_cache, qkv_weight=None):
        """x (N, dim): the engine's packed new tokens `ids` at `positions`; K/V live in the paged kv_cache.
        qkv_weight: the c_q, c_k, c_v weights concatenated (the engine keeps a copy), for one GEMM, not three."""
        N, cfg = x.size(0), self.cfg
        if qkv_weight is None:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            kv_dim = cfg.n_kv_head * cfg.head_dim
            q, k, v = F.linear(x, qkv_weight).split([cfg.n_head * cfg.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(N, cfg.n_head, cfg.head_dim)
        k = k.view(N, cfg.n_kv_head, cfg.head_dim)
        v = self._mix_value(x, v.view(N, cfg.n_kv_head, cfg.head_dim), ids)
        q, k = ops.rope_qknorm(q, k, cos, sin, positions, cfg.norm_eps, cfg.qk_scale)
        y = paged_attention_step(q, k, v, kv_cache[0], kv_cache[1], batch, self.window)
        return self.c_proj(y.reshape(N, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, ids):
        x = x + self.attn(rms_norm(x, self.eps), cos, sin, ids)
        return x + self.mlp(rms_norm(x, self.eps))

    def forward_paged(self, x, ids, positions, cos, sin, batch, kv_cache, qkv_weight=None):
        x = x + self.attn.forward_paged(rms_norm(x, self.eps), ids, positions, cos, sin, batch, kv_cache, qkv_weight)
        return x + self.mlp(rms_norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = nn.Linear(config.dim, config.padded_vocab, bias=False)
        if config.layer_scalars:   # modded-nanogpt's: before block i, x = resid[i] * x + x0[i] * (the embedding)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Parameter(torch.zeros(SMEAR_CHANNELS))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # Rotary tables cover 4x the training length so generation can run past it.
        cos, sin = rotary_tables(4 * config.seq_len, config.head_dim, config.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) for inference must not round the rotary tables: rebuild them in float32.
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            cos, sin = rotary_tables(self.cos.size(0), self.config.head_dim, self.config.rope_base, self.cos.device)
            self.cos, self.sin = cos, sin
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        """nanochat-style init: unit-variance embedding, tiny LM head, zero output projections (nanochat_init:
        its current scales, embedding std 0.8 and the MLP's input matrix at 0.4x); the options' own
        parameters as nanochat initializes them."""
        cfg = self.config
        gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        self.wte.weight.normal_(0.0, 0.8 if cfg.nanochat_init else 1.0, generator=gen)
        self.lm_head.weight.normal_(0.0, 0.001, generator=gen)
        bound = 3 ** 0.5 * cfg.dim ** -0.5
        fc_bound = 0.4 * bound if cfg.nanochat_init else bound
        for block in self.blocks:
            for lin, b in ((block.attn.c_q, bound), (block.attn.c_k, bound), (block.attn.c_v, bound),
                           (block.mlp.c_fc, fc_bound)):
                lin.weight.uniform_(-b, b, generator=gen)
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        # The options' parameters draw after everything above, so turning one on leaves the rest as they were.
        for block in self.blocks:
            if block.attn.value_embed is not None:
                block.attn.value_embed.weight.uniform_(-bound, bound, generator=gen)
                block.attn.ve_gate.weight.uniform_(0.0, 0.02, generator=gen)   # gates start a little above 1.5
        if cfg.layer_scalars:   # more residual and more embedding early, less deep down
            depth_frac = torch.arange(cfg.n_layer, device=self.wte.weight.device) / max(cfg.n_layer - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
        if cfg.smear:
            self.smear_gate.uniform_(0.0, 0.02, generator=gen)
            self.smear_lambda.zero_()
        if cfg.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = rotary_tables(self.cos.size(0), self.config.head_dim, self.config.rope_base, self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        return self

    def hidden_states(self, idx):
        T = idx.size(1)
        if T > self.max_context:
            raise ValueError(f"sequence of {T} tokens is longer than the rotary table ({self.max_context})")
        x = rms_norm(self.wte(idx), self.config.norm_eps)
        if self.config.smear:
            x = torch.cat([x[:, :1], self._smear(x[:, 1:], x[:, :-1])], dim=1)
        cos, sin = self.cos[:T], self.sin[:T]
        return rms_norm(self._trunk(x, lambda i, block, x: block(x, cos, sin, idx)), self.config.norm_eps)

    def _smear(self, x, prev):
        """x plus a gated share of prev, the previous token's embedding: bigram information before any attention."""
        gate = self.smear_lambda * torch.sigmoid(x[..., :SMEAR_CHANNELS] @ self.smear_gate)
        return x + gate.unsqueeze(-1) * prev

    def _trunk(self, x, run_block):
        """The blocks, from the embedding x to the final norm (not applied); run_block(i, block, x) runs one.
        layer_scalars mix the embedding back in before each block; backout then subtracts a learned share of
        the residual after the middle block (its low-level features) from the output."""
        cfg = self.config
        x0, mid = x, None
        for i, block in enumerate(self.blocks):
            if cfg.layer_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = run_block(i, block, x)
            if i == cfg.n_layer // 2:
                mid = x
        return x - self.backout_lambda * mid if cfg.backout else x

    def forward(self, idx, targets=None, reduction="mean"):
        """Loss (mean over targets != -1, their sum, or per token: reduction "mean" / "sum" / "none") or, without targets,
        the softcapped float32 logits (B, T, V)."""
        x = self.hidden_states(idx)
        w = self.lm_head.weight[:self.config.vocab_size]
        if torch.is_autocast_enabled(x.device.type):
            # The fused head runs its GEMMs in the compute dtype, not the fp32 master weights.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
        if targets is None:
            logits = F.linear(x, w).float()
            cap = self.config.softcap
            return cap * torch.tanh(logits / cap) if cap else logits
        loss = ops.softcap_cross_entropy(x.flatten(0, 1), w, targets.flatten(), self.config.softcap,
                                         -1, reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def forward_paged(self, ids, positions, batch: PagedBatch, kv_caches, logits_at=None, out=None, qkv_weights=None,
                      prev_ids=None):
        """The engine's forward over a packed batch of new tokens (N,) with the paged KV cache
        (one (k_cache, v_cache) pair per layer). Returns softcapped float32 logits at the rows
        `logits_at` (e.g. each sequence's last token), or at every row; written into `out` when given.
        qkv_weights: per layer, that layer's c_q, c_k, c_v weights concatenated (see Attention.forward_paged).
        prev_ids (N,): each token's predecessor, any valid id at position 0; needed when config.smear."""
        eps = self.config.norm_eps
        x = rms_norm(self.wte(ids), eps)
        if self.config.smear:
            x = self._smear(x, rms_norm(self.wte(prev_ids), eps) * (positions > 0).unsqueeze(-1))
        x = self._trunk(x, lambda i, block, x: block.forward_paged(
            x, ids, positions, self.cos, self.sin, batch, kv_caches[i], None if qkv_weights is None else qkv_weights[i]))
        if logits_at is not None:
            x = x[logits_at]
        logits = F.linear(rms_norm(x, eps), self.lm_head.weight[:self.config.vocab_size])
        out = logits.float() if out is None else out.copy_(logits)
        cap = self.config.softcap
        # in place: a CUDA graph would keep each (N, V) float32 temporary in its memory pool
        return out.div_(cap).tanh_().mul_(cap) if cap else out

    # ---- what the inference engine (fastchat_core/engine/) reads, besides `config` and forward_paged ----

    @property
    def max_context(self) -> int:
        """The longest sequence the model can run (prompt + generated tokens): its rotary table covers 4x
        the training length."""
        return self.cos.size(0)

    def qkv_parts(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer, the (c_q, c_k, c_v) weights. Read from the modules each call: a
        load_state_dict(assign=True) puts new Parameters there."""
        return [(b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight) for b in self.blocks]

    @torch.no_grad()
    def fuse_qkv(self, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, the q, k and v weights concatenated (forward_paged's qkv_weights: one GEMM, not three);
        written in place into `out` (an earlier result) when given, so that its addresses stay the same."""
        if out is None:
            return [torch.cat(parts) for parts in self.qkv_parts()]
        for fused, parts in zip(out, self.qkv_parts()):
            torch.cat(parts, out=fused)
        return out

    def qkv_version(self) -> list[tuple]:
        """Changes whenever fuse_qkv's result would: which tensor each weight is, where its data is, its
        version counter (bumped by in-place updates: optimizer steps, load_state_dict). Writes through
        `.data` bump no counter (fuse again regardless after those); inference tensors have no counter."""
        return [(id(w), w.data_ptr(), None if w.is_inference() else w._version)
                for parts in self.qkv_parts() for w in parts]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len=None) -> int:
        return self.config.flops_per_token(seq_len)

    @torch.no_grad()
    def generate(self, ids, max_new_tokens, temperature=0.0, top_k=None, seed=0):
        """Naive decoding by full recompute (no KV cache): the correctness oracle for the engine and a
        quick way to sample during training. Yields token ids."""
        device = self.wte.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        ids = list(ids)
        for _ in range(max_new_tokens):
            logits = self(torch.tensor([ids], device=device))[0, -1]
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            ids.append(nxt)
            yield nxt

"""Per-request sampling settings and the batched sampler.

Sampling draws with the exponential race: token = argmax(p_i / E_i) with E_i ~ Exp(1) is an exact draw
from p, and it lets the filtering (temperature, top-k, top-p) run on the whole batch at once while each
seeded request takes its own noise. That noise is a function of (seed, token index) alone, not a stream
read in order: a seeded request gets the same tokens whatever else shares its batch, and a draw the engine
makes ahead and then throws away (the token after a tool call is pasted, not sampled) shifts nothing.
Unseeded requests share one engine generator (one launch for all of them).
"""
import hashlib
from dataclasses import dataclass, field

import torch

from fastchat_core.engine.transfer import to_device


@dataclass
class SamplingParams:
    max_tokens: int = 256            # generated tokens at most (tool output pasted by the engine counts too)
    temperature: float = 1.0         # 0 = greedy
    top_k: int = 0                   # 0 = no top-k filter
    top_p: float = 1.0               # 1 = no nucleus filter
    seed: int | None = None          # reproducible tokens whatever the batch is
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)   # stop strings, matched on decoded text (needs a tokenizer)
    ignore_eos: bool = False         # keep going past <|assistant_end|> / <|bos|>

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


def _token_seed(seed: int, index: int) -> int:
    """The generator seed for a request's index-th output token. Hashed, so that nearby pairs share nothing
    (the server gives choice i seed + i), and spread over all 64 bits (the CPU generator keeps only 32)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little")


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int], default_gen) -> torch.Tensor:
    """One token per row of float32 logits (B, V): greedy rows take the argmax, others are drawn after
    temperature, top-k and top-p. A seeded row's noise comes from (its seed, indices[i]: the output index of
    the token it draws); unseeded rows draw from `default_gen`. Returns int64 (B,) on the logits' device."""
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    dev, V = logits.device, logits.size(-1)
    sel = to_device(dev, rows, torch.long)
    x = logits[sel] / to_device(dev, [params[i].temperature for i in rows], torch.float32).unsqueeze(1)
    ks = [params[i].top_k if 0 < params[i].top_k < V else 0 for i in rows]
    if any(ks):
        # one top-k as wide as the widest filter; rows without a filter get a -inf threshold
        kth_index = to_device(dev, [max(k, 1) - 1 for k in ks], torch.long)[:, None]
        kth = x.topk(max(ks), dim=-1).values.gather(1, kth_index)
        kth = kth.masked_fill(to_device(dev, [k == 0 for k in ks], torch.bool)[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    ps = [params[i].top_p for i in rows]
    if any(p < 1 for p in ps):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # keep a token while the mass ranked above it is below top_p: the top token always stays
        drop = probs.cumsum(-1) - probs >= to_device(dev, ps, torch.float32).unsqueeze(1)
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=default_gen)
    seeded = [(j, i) for j, i in enumerate(rows) if params[i].seed is not None]
    gen = torch.Generator(device=dev) if seeded else None
    for j, i in seeded:   # reseeding is a host op: no sync, and the launch keeps its seed
        noise[j].exponential_(generator=gen.manual_seed(_token_seed(params[i].seed, indices[i])))
    tokens[sel] = (probs / noise).argmax(-1)
    return tokens

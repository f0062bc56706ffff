"""Per-request sampling settings and the batched sampler.

Sampling draws with the exponential race: token = argmax(p_i / E_i) with E_i ~ Exp(1) is an exact draw
from p, and it lets the filtering (temperature, top-k, top-p) run on the whole batch at once while each
seeded request takes its own noise. That noise is a function of (seed, token index) alone, not a stream
read in order: a seeded request gets the same tokens whatever else shares its batch, and a draw the engine
makes ahead and then throws away (the token after a tool call is pasted, not sampled) shifts nothing.
Unseeded requests share one engine generator (one launch for all of them).

Before any of that, `penalize` applies logit_bias, presence/frequency penalties and min_tokens (a ban on the
end tokens) to the rows that ask for them, with tensor ops over the batch (a scatter of each row's output
tokens into counts): no loop over the vocabulary, and rows without them are not touched or copied.
`token_logprobs` reports log-probabilities from the raw softcapped logits, before penalties, temperature and
filters (vLLM's default "raw" mode): the model's own distribution, whatever the sampling settings are.
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
    min_tokens: int = 0              # the end tokens (EOS, stop_token_ids) are banned before this many
    presence_penalty: float = 0.0    # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0   # subtracted once per time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    logprobs: int | None = None      # report each output token's logprob and this many top alternatives
    prompt_logprobs: int | None = None   # the same for every prompt token after the first (0 = itself only)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < (self.prompt_logprobs is None):
            raise ValueError(f"max_tokens must be a positive integer (0 only to score the prompt, with "
                             f"prompt_logprobs), got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and (not isinstance(k, int) or k < 0):
                raise ValueError(f"logprobs / prompt_logprobs must be None (off) or an integer >= 0, got {k!r}")
        # a NaN or an infinity here would turn whole rows of logits into NaN: argmax and sampling then return junk
        for name, v in (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty),
                        *((f"logit_bias[{t}]", b) for t, b in self.logit_bias.items())):
            if not -1e4 <= v <= 1e4:
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        # read by the engine every step for every sequence: one attribute, so that batches without any of these
        # features pay one pass over the batch, not the several penalize makes
        self.adjusts_logits = bool(self.penalized or self.logit_bias or self.min_tokens)

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the counts of the tokens generated so far."""
        return bool(self.presence_penalty or self.frequency_penalty)


def _token_seed(seed: int, index: int) -> int:
    """The generator seed for a request's index-th output token. Hashed, so that nearby pairs share nothing
    (the server gives choice i seed + i), and spread over all 64 bits (the CPU generator keeps only 32)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest(), "little")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probabilities under float32 logits (B, V): of tokens (B,), and the k most likely (values and ids,
    (B, k) each, best first)."""
    lp = logits.log_softmax(-1)
    top = lp.topk(min(k, lp.size(-1)), dim=-1)
    return lp.gather(1, tokens.unsqueeze(1)).squeeze(1), top.values, top.indices


def penalize(logits, params: list[SamplingParams], indices: list[int], history=None, end_ids=()) -> torch.Tensor:
    """The logits with each row's logit_bias, presence and frequency penalties and min_tokens ban applied;
    the same tensor when no row has any. history: int64 (P, L) on the device, the output tokens so far of
    the `penalized` rows in row order, padded with -1. end_ids: the tokens min_tokens bans besides each
    row's stop_token_ids (the engine's EOS tokens); indices[i]: how many tokens row i has generated."""
    early = [i < p.min_tokens for p, i in zip(params, indices)]
    rows = [i for i, p in enumerate(params) if p.penalized or p.logit_bias or early[i]]
    if not rows:
        return logits
    dev, V = logits.device, logits.size(-1)
    x = logits[to_device(dev, rows, torch.long)]
    pen = [j for j, i in enumerate(rows) if params[i].penalized]
    if pen:
        # counts of each row's tokens: -1 padding lands in an extra column that is dropped
        counts = torch.zeros(len(pen), V + 1, device=dev).scatter_add_(
            1, history.masked_fill(history < 0, V), torch.ones(history.shape, device=dev))[:, :V]
        freq, pres = (to_device(dev, [getattr(params[rows[j]], f) for j in pen], torch.float32).unsqueeze(1)
                      for f in ("frequency_penalty", "presence_penalty"))
        sel = to_device(dev, pen, torch.long)
        x[sel] -= freq * counts + pres * (counts > 0)
    # (row, token, value) triples for the bias and the bans, applied in one indexed write each
    bias = [(j, t, b) for j, i in enumerate(rows) for t, b in params[i].logit_bias.items()]
    if bias:
        r, t, b = zip(*bias)
        x.index_put_((to_device(dev, r, torch.long), to_device(dev, t, torch.long)),
                     to_device(dev, b, torch.float32), accumulate=True)
    ban = [(j, t) for j, i in enumerate(rows) if early[i]
           for t in {*(() if params[i].ignore_eos else end_ids), *params[i].stop_token_ids}]
    if ban:
        r, t = zip(*ban)
        x.index_put_((to_device(dev, r, torch.long), to_device(dev, t, torch.long)),
                     x.new_full((len(r),), float("-inf")))
    return logits.index_put((to_device(dev, rows, torch.long),), x)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int], default_gen) -> torch.Tensor:
    """One token per row of float32 logits (B, V) (after `penalize`): greedy rows take the argmax, others are
    drawn after temperature, top-k and top-p. A seeded row's noise comes from (its seed, indices[i]: the
    output index of the token it draws); unseeded rows draw from `default_gen`. Returns int64 (B,) on the
    logits' device."""
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

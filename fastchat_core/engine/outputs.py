"""What a request gets back, and the rules that decide it: stop tokens and lengths, incremental
detokenization, stop strings (text that could still become one is held back)."""
from typing import NamedTuple

from fastchat_core.engine.sequence import Sequence


class Result(NamedTuple):
    token_ids: list[int]        # generated tokens (tool output included; a stop token is the last one)
    text: str                   # their text without a stop token, cut before a stop string ("" without tokenizer)
    finish_reason: str          # "stop" (EOS, stop token or stop string), "length" or "abort"
    num_prompt_tokens: int
    num_cached_tokens: int      # prompt tokens served from the prefix cache
    # per token, (logprob, [(token id, logprob), ...] best first: as many as asked for), when SamplingParams
    # asked: the output's (None for pasted tool output) and the prompt's from its second token on
    logprobs: list | None = None
    prompt_logprobs: list | None = None


class Delta(NamedTuple):
    """What one step produced for one request."""
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    text: str = ""              # new text; held back while it could still become a stop string
    result: Result | None = None   # the whole result, on the final delta
    logprobs: list | None = None   # the new tokens' logprob entries, when SamplingParams.logprobs asked
    prompt_logprobs: list | None = None   # on the first token's delta, when SamplingParams.prompt_logprobs asked


def stop_reason(seq: Sequence, token: int, eos_ids: set[int]) -> tuple[str | None, bool]:
    """(finish reason or None, whether `token` is a stop token) after the sequence's newest token `token`."""
    p = seq.params
    stopped_by_token = token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids)
    reason = "stop" if stopped_by_token else "length" if seq.num_output_tokens >= p.max_tokens else None
    return reason, stopped_by_token


def detokenize(seq: Sequence, tokenizer, reason: str | None, stopped_by_token: bool) -> str | None:
    """Decode the new tokens (not a stop token) into seq.text and look for stop strings; returns the reason."""
    end = seq.num_output_tokens - stopped_by_token
    pending = seq.token_ids[seq.num_prompt_tokens + seq.read_offset:seq.num_prompt_tokens + end]
    if pending:
        piece = tokenizer.decode(pending)
        # A character split across tokens decodes as U+FFFD until its last byte (at most 4 tokens) arrives.
        if reason or not piece.endswith("\ufffd") or len(pending) >= 4:
            old = len(seq.text)
            seq.text += piece
            seq.read_offset = end
            longest = max(map(len, seq.params.stop), default=0)
            hits = [i for i in (seq.text.find(s, max(0, old - longest + 1)) for s in seq.params.stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                return "stop"
    return reason


def take_new_text(seq: Sequence, finished: bool) -> str:
    """The text not sent yet, less the tail that could still grow into a stop string (all of it when finished)."""
    held = 0 if finished else max(map(len, seq.params.stop), default=1) - 1
    text = seq.text[seq.sent_chars:max(seq.sent_chars, len(seq.text) - held)]
    seq.sent_chars += len(text)
    return text

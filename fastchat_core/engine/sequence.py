"""A request's state inside the engine: its tokens, how far its K/V is computed, its tool and text state."""
import itertools
from collections import deque

from fastchat_core.engine.sampler import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
PENDING = -1   # stands in for a token that was sampled on the GPU but has not reached the host yet

_seq_ids = itertools.count()


class Sequence:
    """One request's tokens and progress. token_ids = prompt + output; K/V exist for token_ids[:num_computed]."""

    def __init__(self, request_id, prompt_ids: list[int], params: SamplingParams):
        self.seq_id = next(_seq_ids)          # the BlockManager's key; request ids are the user's
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = WAITING
        self.num_computed = 0
        self.prefill_len = 0                  # tokens to compute before the next sample (set on admission)
        self.num_cached_tokens = None         # prompt tokens found in the prefix cache on first admission
        self.forced = deque()                 # tool output to paste in instead of sampling
        self.tool = None                      # a running sandboxed tool call (Future of its output text)
        self.finish_reason = None
        # detokenization state (outputs.py): text of output_ids[:read_offset], and how much of it was sent
        self.text = ""
        self.read_offset = 0
        self.sent_chars = 0
        self.arrival_time = self.last_token_time = None
        # per token, (logprob, [(token id, logprob), ...] best first): the output's, aligned with output_ids
        # (None for pasted tool output), and the prompt's from its second token on (params.prompt_logprobs)
        self.logprobs = [] if params.logprobs is not None else None
        self.prompt_logprobs = [] if params.prompt_logprobs is not None else None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def waits_on_tool(self) -> bool:
        """Nothing to decode until the tool's output arrives (it is pasted, not sampled)."""
        return self.tool is not None and not self.forced

    @property
    def scores_prompt(self) -> bool:
        """Its prefill must return the logits of every prompt position: prompt logprobs were asked for and no
        output exists yet (a sequence preempted after its first token has them already)."""
        return self.prompt_logprobs is not None and self.num_output_tokens == 0

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_len

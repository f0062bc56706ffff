"""Tool use, as nanochat does it: when the model closes <|python_start|> code <|python_end|>, the code runs
through tools.calculator (pure arithmetic, in process) or else tools.tool_output (the OS sandbox, run on a
worker thread so that only that sequence pauses while it runs; where the sandbox cannot run, its error is the
output), and <|output_start|> result <|output_end|> is forced into the sequence one token per step instead
of sampling. Those tokens count toward max_tokens, so prompt + max_tokens always bounds a sequence's length.
"""
import concurrent.futures

from fastchat_core import tools
from fastchat_core.engine.sequence import Sequence


class ToolCalls:
    """Runs the tool calls sequences make and queues their output in `seq.forced` for the engine to paste."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # (python_start, python_end, output_start, output_end); None without a tokenizer: no tool use
        self.ids = None
        if tokenizer is not None:
            self.ids = tuple(tokenizer.encode_special(f"<|{t}|>")
                             for t in ("python_start", "python_end", "output_start", "output_end"))
        # sandboxed calls run beside the steps, so a slow one pauses only its own sequence
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="tool")
        self.waiters: set[Sequence] = set()   # sequences whose tool call is still running

    def on_token(self, seq: Sequence, token: int):
        """`token` is the sequence's newest: if it closes a tool call, run the code since <|python_start|>."""
        if self.ids is None or token != self.ids[1]:
            return
        start, end, out_start, out_end = self.ids
        ids = seq.token_ids
        for i in range(len(ids) - 2, -1, -1):
            if ids[i] == end:
                return   # the last call was closed already: this <|python_end|> has no code to run
            if ids[i] == start:
                break
        else:
            return
        code = self.tokenizer.decode(ids[i + 1:-1])
        output = tools.calculator(code)
        if output is not None:  # pure arithmetic: answered in process, at once
            seq.forced.extend([out_start, *self.tokenizer.encode(output.strip()), out_end])
        else:
            seq.forced.append(out_start)
            seq.tool = self.pool.submit(tools.tool_output, code)
            self.waiters.add(seq)

    def collect(self, seqs=None, block=False):
        """Paste the output of finished tool calls (of `seqs`, default all; waiting for them with block)."""
        for seq in seqs if seqs is not None else list(self.waiters):
            if seq.tool is not None and (block or seq.tool.done()):
                output = seq.tool.result()
                seq.tool = None
                self.waiters.discard(seq)
                seq.forced.extend([*self.tokenizer.encode(output.strip()), self.ids[3]])

    def wait(self, timeout=0.05):
        """Every runnable sequence is waiting on a tool: sleep until one finishes instead of spinning."""
        pending = [s.tool for s in self.waiters]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)

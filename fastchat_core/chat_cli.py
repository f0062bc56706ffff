"""Chat with a trained model in the terminal: `fastchat chat` (interactive) or `fastchat chat -p "question"`.

The Engine runs in this process, no server. The conversation is kept as messages and re-rendered each turn
(the prefix cache makes the repeated history nearly free). In the interactive chat /clear starts a new
conversation, /exit (or Ctrl-D) quits, and Ctrl-C stops the answer being written.
Tool calls stream like any text; on a terminal they are coloured, elsewhere they keep their raw markers.

Also home to the model flags `fastchat serve` shares with it (add_model_args, engine_options).
"""
import argparse
import sys
from dataclasses import replace

from fastchat_core import engine as inference
from fastchat_core.engine import Engine, SamplingParams
from fastchat_core.tokenizer import assistant_parts

_DIM, _CYAN, _RESET = "\033[2m", "\033[36m", "\033[0m"
_TERMINAL_STYLE = {"<|python_start|>": f"{_CYAN}[python] ", "<|python_end|>": f"{_RESET}\n",
                   "<|output_start|>": f"{_DIM}[output] ", "<|output_end|>": f"{_RESET}\n"}


def add_model_args(p: argparse.ArgumentParser):
    """The flags that pick a model and size its engine (engine_options turns them into load_engine's keywords)."""
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint or run folder (default: the latest under $FASTCHAT_HOME/rl, else sft, mid, base)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (default: the checkpoint's training tokenizer, else $FASTCHAT_HOME/tokenizer)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--kv-fraction", type=float, default=0.9,
                   help="share of the GPU memory free after loading the model that the KV cache takes (cuda)")


def engine_options(args) -> dict:
    """fastchat_core.engine.load_engine's keywords for the flags of add_model_args."""
    return dict(checkpoint=args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                kv_fraction=args.kv_fraction)


def styled(text: str, terminal: bool) -> str:
    for marker, style in _TERMINAL_STYLE.items() if terminal else ():
        text = text.replace(marker, style)
    return text


def reply(engine: Engine, tok, messages, params: SamplingParams, out) -> str:
    """Stream the assistant's answer to `out`; returns its text. Ctrl-C stops it early (the text so far counts).
    Raises ValueError when the conversation no longer fits the context."""
    prompt = tok.render_for_completion(messages)
    room = engine.max_model_len - len(prompt)
    if room < 1:
        raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context: /clear to start over")
    request_id = engine.add_request(prompt, replace(params, max_tokens=min(params.max_tokens, room)))
    terminal, text = out.isatty(), ""
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                text += delta.text
                out.write(styled(delta.text, terminal))
                out.flush()
    except KeyboardInterrupt:
        engine.abort(request_id)
    out.write(_RESET + "\n" if terminal else "\n")
    return text


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="fastchat chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and exit")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--seed", type=int, default=None, help="for reproducible answers")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    out = sys.stdout
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"fastchat chat: {e}") from None
    engine, tok, ckpt = inference.load_engine(**engine_options(args), max_num_seqs=1, max_num_batched_tokens=2048)
    if args.prompt is not None:
        try:
            reply(engine, tok, [{"role": "user", "content": args.prompt}], params, out)
        except ValueError as e:
            raise SystemExit(f"fastchat chat: {e}") from None
        return 0
    try:
        import readline  # noqa: F401  (line editing for input())
    except ImportError:
        pass
    out.write(f"chatting with {ckpt}\ntype a message; /clear starts a new conversation, /exit quits\n")
    messages = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line == "/exit":
            break
        if line == "/clear":
            messages = []
            out.write("(new conversation)\n")
            continue
        if not line or line.startswith("/"):
            if line:
                out.write(f"unknown command {line!r}: /clear or /exit\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write("assistant> ")
        try:
            text = reply(engine, tok, messages, params, out)
        except ValueError as e:
            out.write(f"\n{e}\n")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": assistant_parts(text)})
    out.write("\n")
    return 0


if __name__ == "__main__":
    from fastchat_core.cli import run
    sys.exit(run(main, sys.argv[1:], "fastchat chat"))

"""Train or evaluate the tokenizer: `fastchat tokenizer train|eval ...` (or `python -m fastchat_core.train.tokenizer`).

train: BPE on the documents of a data folder or file, each document cut to --doc-cap chars and the total to
--max-chars. The validation split of fastchat_core.data is left out (in a folder its last file, in a single
file every 100th document): it is the held-out text that `eval` measures on, as pretraining evaluates on it.
eval: compression (UTF-8 bytes per token, higher is better) on that held-out text and on built-in samples,
beside GPT-2's and GPT-4's tokenizers when tiktoken can load them without a network.
"""
import argparse
import socket
import sys
import time
from pathlib import Path

from fastchat_core.cli import run as run_command
from fastchat_core.common import ConfigError, DataError
from fastchat_core.data import iter_texts, list_files
from fastchat_core.tokenizer import Tokenizer, default_path, get_tokenizer

HELDOUT_CHARS = 5_000_000  # enough for a stable ratio, small enough to encode in seconds

# Small hand-written samples of the kinds of text a chat model sees.
SAMPLES = {
    "english": (
        "The library opened an hour late on Tuesday because the heating had failed overnight. Volunteers "
        "carried space heaters up from the basement, and by noon the reading room was warm enough that "
        "people took off their coats and settled in with newspapers and laptops."
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i]); i += 1\n"
        "        else:\n"
        "            out.append(b[j]); j += 1\n"
        "    return out + a[i:] + b[j:]\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which is zero at x = 2, so the minimum is "
        "f(2) = 12 - 24 + 7 = -5. Check: 1234 * 56 = 69104 and 69104 / 8 = 8638."
    ),
    "non-english": (
        "Der Zug nach München hatte zwanzig Minuten Verspätung. "
        "Il pleuvait encore quand nous sommes arrivés à la gare. "
        "東京の天気は明日から晴れるでしょう。 "
        "Привет, как дела? "
        "مرحبا بالعالم"
    ),
}


def data_files(path) -> list[Path]:
    """fastchat_core.data.list_files, its errors naming the flag."""
    try:
        return list_files(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"--data: {e}") from None


def capped_texts(docs, max_chars: int, doc_cap: int):
    """Each document cut to doc_cap chars; stops once max_chars have been yielded in total."""
    total = 0
    for doc in docs:
        if total >= max_chars:
            return
        doc = doc[: min(doc_cap, max_chars - total)]
        total += len(doc)
        yield doc


def train(args):
    files = data_files(args.data)
    n_train = len(files) - 1 if len(files) > 1 else 1   # the last file is the held-out split
    docs = iter_texts(args.data, split="train")
    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(capped_texts(docs, int(args.max_chars), args.doc_cap), args.vocab_size)
    dt = time.perf_counter() - t0
    print(f"trained a {tok.vocab_size}-token vocabulary on {n_train} file(s) in {dt:.1f}s")
    if tok.vocab_size < args.vocab_size:
        print(f"note: asked for {args.vocab_size} tokens, but this text only had enough pairs for {tok.vocab_size}")
    out = Path(args.out) if args.out else default_path()
    tok.save(out)
    print(f"saved to {out}")
    for name, text in SAMPLES.items():
        ids = tok.encode(text[:120])
        pieces = "|".join(tok.decode([i]).replace("\n", "\\n") for i in ids)
        print(f"{name} ({len(ids)} tokens): {pieces}")


def _reference_encoders() -> dict:
    """GPT-2 and GPT-4 encode functions from tiktoken, or fewer when it or its files are unavailable."""
    try:
        import tiktoken
    except ImportError:
        return {}
    encoders = {}
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)  # a missing cache makes tiktoken download: fail fast when offline
    try:
        for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
            try:
                encoders[label] = tiktoken.get_encoding(name).encode_ordinary
            except Exception:  # no network and no cached file: leave it out of the table
                pass
    finally:
        socket.setdefaulttimeout(old_timeout)
    return encoders


def compression_table(encoders: dict, texts: dict) -> dict:
    """{text name: {encoder name: bytes per token}} for every text and encoder."""
    return {name: {enc: len(text.encode()) / max(1, len(fn(text))) for enc, fn in encoders.items()}
            for name, text in texts.items()}


def evaluate(args):
    try:
        tok = get_tokenizer(args.tokenizer)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    texts = dict(SAMPLES)
    if args.data:
        heldout = data_files(args.data)[-1]
        docs = iter_texts(args.data, split="val")
        texts[f"held-out ({heldout.name})"] = "".join(capped_texts(docs, HELDOUT_CHARS, HELDOUT_CHARS))
    encoders = {"ours": tok.encode, **_reference_encoders()}
    table = compression_table(encoders, texts)
    width = max(len(n) for n in texts) + 2
    print(f"bytes per token (higher = better compression); our vocab: {tok.vocab_size}")
    print(f"{'text':<{width}}{'bytes':>10}" + "".join(f"{e:>10}" for e in encoders))
    for name, row in table.items():
        print(f"{name:<{width}}{len(texts[name].encode()):>10}" + "".join(f"{row[e]:>10.2f}" for e in encoders))
    if len(encoders) == 1:
        print("(GPT-2/GPT-4 columns need tiktoken with its encodings cached locally; showing ours only)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastchat tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a BPE tokenizer on a data folder or file")
    p.add_argument("--data", required=True, help="folder or file of parquet / jsonl(.gz) / txt(.gz) text")
    p.add_argument("--vocab-size", type=int, default=65536, help="tokens in all, special tokens included")
    p.add_argument("--max-chars", type=float, default=2e9, help="stop after this many characters in total")
    p.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters per document")
    p.add_argument("--out", default=None, help="where to save (default $FASTCHAT_HOME/tokenizer/tokenizer.json)")
    p.set_defaults(fn=train)
    p = sub.add_parser("eval", help="compression of the tokenizer vs GPT-2/GPT-4")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default $FASTCHAT_HOME/tokenizer/tokenizer.json)")
    p.add_argument("--data", default=None, help="data folder whose last file is the held-out text")
    p.set_defaults(fn=evaluate)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], "fastchat tokenizer"))

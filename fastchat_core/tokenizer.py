"""Byte-level BPE tokenizer (HF `tokenizers` underneath), special tokens, and chat rendering to ids + loss mask.

Training and encoding run in Rust; decoding is a Python byte-table lookup so that any id sequence, even one
that stops in the middle of a UTF-8 character, decodes without error (bad bytes become U+FFFD).
The whole tokenizer is one JSON file (HF's format), so it can also be opened with `tokenizers` directly.
"""
import os
import re
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from fastchat_core.common import home_dir

SPECIAL_TOKENS = (
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant writes a tool call ...
    "<|output_start|>", "<|output_end|>",  # ... and the tool's output is pasted back between these
)

# GPT-4's (cl100k) split pattern with one change: digits are split into groups of at most 2 rather than 3,
# as nanochat does, so a small vocabulary spends 100 slots on numbers instead of 1000.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

_REPLACEMENT = "\ufffd".encode()
_TOOL_SPAN = re.compile(r"<\|(python|output)_start\|>(.*?)(?:<\|\1_end\|>|\Z)", re.S)


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: each byte is stored in the vocab as one printable character.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) take the code
    points 256, 257, ... in byte order. This is GPT-2's scheme, which `tokenizers`' ByteLevel also uses.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in chars.values()]
    chars.update({chr(256 + i): b for i, b in enumerate(others)})
    return chars


class Tokenizer:
    """A trained byte-level BPE with the chat special tokens. Build with `train_from_iterator` or `load`."""

    def __init__(self, hf: HFTokenizer):
        missing = [s for s in SPECIAL_TOKENS if hf.token_to_id(s) is None]
        if missing:
            raise ValueError(f"not a fastchat tokenizer: special tokens {missing} are missing "
                             "(train one with `fastchat tokenizer train --data DIR`)")
        # Match special-token strings in input as ordinary text: a user typing "<|bos|>" must not be able to
        # forge a control token. Specials are only reachable through encode_special / prepend / append.
        # (This flag is not stored in the JSON file, so it is set on every load.)
        hf.encode_special_tokens = True
        self._hf = hf
        self._special = {s: hf.token_to_id(s) for s in SPECIAL_TOKENS}
        vocab = hf.get_vocab(with_added_tokens=True)
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("tokenizer ids are not contiguous 0..V-1; retrain it with `fastchat tokenizer train`")
        chars = _byte_level_chars()
        self._bytes = [b""] * len(vocab)  # id -> the bytes it decodes to (specials: their own text)
        for token, i in vocab.items():
            self._bytes[i] = token.encode() if token in self._special else bytes(chars[c] for c in token)

    # ---- construction and files -------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts, vocab_size: int = 65536) -> "Tokenizer":
        """Train on an iterable of str documents; vocab_size counts the 256 bytes and the special tokens."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_size:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must hold 256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens, so use at least {min_size}")
        hf = HFTokenizer(models.BPE())
        # Split with the regex first (merges never cross those boundaries), then map bytes to characters.
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
            special_tokens=list(SPECIAL_TOKENS),
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    def save(self, path) -> None:
        """Write the tokenizer as one JSON file, atomically (temp file + rename): readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._hf.to_str())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}: run `fastchat tokenizer train --data DIR`")
        return cls(HFTokenizer.from_file(str(path)))

    # ---- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def bos_id(self) -> int:
        return self._special["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """Id of a special token given its exact string, e.g. "<|assistant_end|>"."""
        if name not in self._special:
            raise ValueError(f"unknown special token {name!r}; the special tokens are {list(SPECIAL_TOKENS)}")
        return self._special[name]

    def token_bytes(self) -> torch.Tensor:
        """LongTensor[vocab_size]: UTF-8 bytes each token stands for, 0 for specials (for bits-per-byte)."""
        special_ids = set(self._special.values())
        return torch.tensor([0 if i in special_ids else len(b) for i, b in enumerate(self._bytes)],
                            dtype=torch.long)

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its own text); may be part of a UTF-8 character."""
        return self._bytes[token_id]

    # ---- encode / decode ----------------------------------------------------------------------------------

    def _token_id(self, token) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.vocab_size:
            return token
        raise ValueError(f"prepend/append must be a special-token name or an id in [0, {self.vocab_size}), "
                         f"got {token!r}")

    def encode(self, text, prepend=None, append=None, num_threads=None):
        """str -> list[int]; list[str] -> list[list[int]]. Special-token strings inside text stay plain text.

        prepend/append: a token id or special-token name added to each sequence (e.g. "<|bos|>").
        num_threads (lists only): 1 encodes in the calling thread (for forked DataLoader workers, where a second
        thread pool would oversubscribe the cores); otherwise the Rust batch encoder runs on its Rayon pool,
        which is process-wide and sized once by $RAYON_NUM_THREADS (default: all cores).
        """
        head = [] if prepend is None else [self._token_id(prepend)]
        tail = [] if append is None else [self._token_id(append)]
        if isinstance(text, str):
            return head + self._hf.encode(text, add_special_tokens=False).ids + tail
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")
        if num_threads == 1:
            encodings = [self._hf.encode(t, add_special_tokens=False) for t in text]
        else:
            encodings = self._hf.encode_batch_fast(list(text), add_special_tokens=False)
        return [head + e.ids + tail for e in encodings]

    def decode(self, ids) -> str:
        """Ids -> text. Never raises on odd input: invalid UTF-8 and out-of-range ids become U+FFFD.

        Special tokens decode to their own strings, so rendered conversations stay readable.
        """
        if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
            ids = ids.tolist()
        table, n = self._bytes, len(self._bytes)
        return b"".join(table[i] if 0 <= i < n else _REPLACEMENT for i in ids).decode("utf-8", errors="replace")

    # ---- chat ---------------------------------------------------------------------------------------------

    def render_conversation(self, messages, max_tokens: int | None = 2048):
        """Render a chat to (ids, mask); mask is 1 exactly on tokens the model must learn to produce.

        Layout: <|bos|>, then <|user_start|> text <|user_end|> and <|assistant_start|> ... <|assistant_end|>
        turns. Assistant content is a str or a list of parts {"type": "text"|"python"|"python_output",
        "text": str}. Trained (mask 1): assistant text, python parts with their markers, <|assistant_end|>.
        Not trained (mask 0): bos, user turns, <|assistant_start|> (the renderer writes it), and python_output
        parts with their markers (the tool writes those). Both lists are cut to max_tokens (None: no cut).
        """
        sp = self._special
        ids, mask = [sp["<|bos|>"]], [0]

        def add(tokens, trained):
            ids.extend(tokens)
            mask.extend([int(trained)] * len(tokens))

        turns, offset = _normalize(messages)
        for i, msg in enumerate(turns, start=offset):  # i: the caller's message index, for error messages
            if msg["role"] == "user":
                add([sp["<|user_start|>"], *self.encode(msg["content"]), sp["<|user_end|>"]], False)
                continue
            add([sp["<|assistant_start|>"]], False)
            content = msg["content"]
            if not isinstance(content, (str, list)):
                raise ValueError(f"message {i}: assistant content must be a str or a list of parts")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = _part(part, i)
                if kind == "text":
                    add(self.encode(text), True)
                elif kind == "python":
                    add([sp["<|python_start|>"], *self.encode(text), sp["<|python_end|>"]], True)
                else:  # python_output
                    add([sp["<|output_start|>"], *self.encode(text), sp["<|output_end|>"]], False)
            add([sp["<|assistant_end|>"]], True)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, messages) -> list[int]:
        """Prompt ids that prime the model to answer: the chat minus the final assistant turn (if any), then
        <|assistant_start|>. Never truncated: the caller decides what fits its context."""
        messages = list(messages)
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1].get("role") not in ("user", "system"):
            raise ValueError("render_for_completion needs a conversation whose last turn (after dropping a final "
                             "assistant turn) is a user turn")
        ids, _ = self.render_conversation(messages, max_tokens=None)
        return ids + [self._special["<|assistant_start|>"]]


def assistant_parts(text: str) -> list[dict]:
    """Assistant text with tool markers -> the parts render_conversation takes: text, python (the call),
    python_output. The inverse of rendering: text decoded from an assistant turn comes back as the same tokens."""
    parts, at = [], 0
    for m in _TOOL_SPAN.finditer(text):
        if m.start() > at:
            parts.append({"type": "text", "text": text[at:m.start()]})
        parts.append({"type": "python" if m[1] == "python" else "python_output", "text": m[2]})
        at = m.end()
    if at < len(text):
        parts.append({"type": "text", "text": text[at:]})
    return parts


def _text(content, where: str) -> str:
    """User/system content: a str, or a list of {"type": "text"} parts (the OpenAI form), joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise ValueError(f"{where}: content must be a str or a list of {{'type': 'text', 'text': ...}} parts")


def _part(part, i: int):
    if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
        raise ValueError(f"message {i}: assistant parts must be dicts with type 'text', 'python' or "
                         f"'python_output', got {part!r}")
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError(f"message {i}: part {part.get('type')!r} needs a str 'text' field")
    return part["type"], text


def _normalize(messages) -> tuple[list[dict], int]:
    """Validate roles and fold a leading system message into the first user turn.

    Returns (turns, offset): turns alternate user, assistant, ... starting with user (the last may be either);
    offset is how many leading messages were folded away, so errors can use the caller's numbering.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {m['role']!r}: use 'system', 'user' or 'assistant'")
    out = [dict(m) for m in messages]
    if out[0]["role"] == "system":
        if len(out) < 2 or out[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message (it is merged into it)")
        system = _text(out[0]["content"], "message 0")
        out = out[1:]
        out[0]["content"] = system + "\n\n" + _text(out[0]["content"], "message 1")
    offset = len(messages) - len(out)  # report indices as the caller numbered them
    for i, m in enumerate(out):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i + offset} has role {m['role']!r} where {expected!r} was expected: "
                             "roles must alternate user/assistant, starting with user (an optional system "
                             "message may come first)")
        if expected == "user":
            m["content"] = _text(m["content"], f"message {i + offset}")
    return out, offset


def get_tokenizer(path=None) -> Tokenizer:
    """The trained tokenizer: `path`, or $FASTCHAT_HOME/tokenizer/tokenizer.json by default."""
    return Tokenizer.load(path if path is not None else default_path())


def default_path() -> Path:
    return home_dir() / "tokenizer" / "tokenizer.json"

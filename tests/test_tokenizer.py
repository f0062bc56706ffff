"""Tokenizer: byte-exact round trips, special-token safety, files, batching, bits-per-byte table, chat masks."""
import functools
import gzip
import json
import os

import pytest
import torch

from fastchat_core.common import ConfigError
from fastchat_core.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer
from fastchat_core.train import tokenizer as tokenizer_cli

TRICKY = [
    "",
    " ",
    "\n",
    "   many   spaces   \n\n\n    trailing    ",
    "tabs\tand\t\tmore\t",
    "windows\r\nline\r\nends\r\n",
    "emoji 🎉 and a family 👩‍👩‍👧 and flags 🇯🇵",
    "中文文本，日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 n\u0303, precomposed: é ä ñ",
    "controls \x00\x01\x07\x1b[31mred\x1b[0m \x7f and separators \u2028\u2029\x85",
    "numbers 3.14159 1234567890 -42 1e-9",
    "مرحبا بالعالم",
    "<|bos|> typed by a user <|assistant_end|>",
]


@functools.cache
def _trained(root: str) -> Tokenizer:
    """Train once per session on the first 300 pretraining documents (vocab 1000: about a second)."""
    docs = []
    with gzip.open(os.path.join(root, "pretrain", "shard_000.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"][:10_000])
            if len(docs) == 300:
                break
    return Tokenizer.train_from_iterator(docs, vocab_size=1000)


@pytest.fixture
def tok(data_dir):
    return _trained(data_dir)


def _docs(root, n):
    with gzip.open(os.path.join(root, "pretrain", "shard_001.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["text"][:3000] for _ in range(n)]


def test_vocab_and_specials(tok):
    assert tok.vocab_size == 1000
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.bos_id == tok.encode_special("<|bos|>")
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    specials = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert all(0 <= i < tok.vocab_size and i not in specials for i in ids)


def test_roundtrip_real_text(tok, data_dir):
    for doc in _docs(data_dir, 20):
        assert tok.decode(tok.encode(doc)) == doc


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_strings_in_text_are_plain_text(tok, special):
    ids = tok.encode(special)
    assert len(ids) > 1
    assert tok.encode_special(special) not in ids
    assert tok.decode(ids) == special


def test_decode_never_crashes(tok):
    # Every single token decodes; the lone high bytes (0x80..0xFF) are invalid UTF-8 and must become U+FFFD.
    pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
    assert all(isinstance(p, str) for p in pieces)
    assert sum("\ufffd" in p for p in pieces) >= 64
    # A multi-byte character cut in half, out-of-range and negative ids, a tensor input.
    ids = tok.encode("🎉")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:-1])
    assert tok.decode([tok.vocab_size, -1, 10**12]) == "\ufffd" * 3
    assert tok.decode(torch.tensor(tok.encode("hello world"))) == "hello world"
    # Special tokens decode to their own text.
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_save_load_is_stable(tok, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    tok.save(path)  # overwriting works too
    assert os.listdir(path.parent) == ["tokenizer.json"]  # the temp file was renamed, not left behind
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size
    assert [loaded.encode_special(s) for s in SPECIAL_TOKENS] == [tok.encode_special(s) for s in SPECIAL_TOKENS]
    for text in TRICKY:
        assert loaded.encode(text) == tok.encode(text)  # incl. special strings staying plain text after load
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="fastchat tokenizer train --data DIR"):
        Tokenizer.load(tmp_path / "missing.json")
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer" / "tokenizer.json")):
        get_tokenizer()


def test_get_tokenizer_default_path(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCHAT_HOME", str(tmp_path))
    tok.save(tmp_path / "tokenizer" / "tokenizer.json")
    assert get_tokenizer().encode("hello there") == tok.encode("hello there")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], vocab_size=100)


def test_batched_encode_matches_single(tok, data_dir):
    texts = _docs(data_dir, 30) + TRICKY
    single = [tok.encode(t) for t in texts]
    assert tok.encode(texts) == single
    assert tok.encode(texts, num_threads=1) == single
    assert tok.encode([]) == []
    end = tok.encode_special("<|assistant_end|>")
    framed = tok.encode(texts, prepend="<|bos|>", append=end)
    assert framed == [[tok.bos_id, *ids, end] for ids in single]
    assert tok.encode("hi", prepend=tok.bos_id) == [tok.bos_id, *tok.encode("hi")]
    with pytest.raises(ValueError, match="special-token name or an id"):
        tok.encode("hi", prepend=tok.vocab_size)
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(["ok", 3])


def test_token_bytes_counts_utf8_bytes(tok, data_dir):
    tb = tok.token_bytes()
    assert tb.dtype == torch.long and tb.shape == (tok.vocab_size,)
    for s in SPECIAL_TOKENS:
        assert tb[tok.encode_special(s)] == 0
    assert (tb[[i for i in range(tok.vocab_size) if tb[i] > 0]] >= 1).all()
    assert int((tb == 0).sum()) == len(SPECIAL_TOKENS)
    for text in TRICKY + _docs(data_dir, 10):
        ids = tok.encode(text)
        assert int(tb[torch.tensor(ids, dtype=torch.long)].sum()) == len(text.encode("utf-8"))


def _tool_conversation():
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."},
        ]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]


def test_render_conversation_mask(tok):
    sp = {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    ids, mask = tok.render_conversation(_tool_conversation())
    # Expected stream, built segment by segment with its own training flag.
    segments = [
        ([sp["<|bos|>"]], 0),
        ([sp["<|user_start|>"]], 0), (tok.encode("You are terse.\n\nWhat is 12*34?"), 0), ([sp["<|user_end|>"]], 0),
        ([sp["<|assistant_start|>"]], 0),
        (tok.encode("Let me compute."), 1),
        ([sp["<|python_start|>"]], 1), (tok.encode("12*34"), 1), ([sp["<|python_end|>"]], 1),
        ([sp["<|output_start|>"]], 0), (tok.encode("408"), 0), ([sp["<|output_end|>"]], 0),
        (tok.encode("It is 408."), 1),
        ([sp["<|assistant_end|>"]], 1),
        ([sp["<|user_start|>"]], 0), (tok.encode("Thanks!"), 0), ([sp["<|user_end|>"]], 0),
        ([sp["<|assistant_start|>"]], 0), (tok.encode("You're welcome."), 1), ([sp["<|assistant_end|>"]], 1),
    ]
    expected = [(t, m) for seg, m in segments for t in seg]
    assert len(ids) == len(mask) == len(expected)
    for pos, (got, want) in enumerate(zip(zip(ids, mask), expected)):
        assert got == want, f"token {pos}: got (id, mask) {got}, expected {want} ({tok.decode([want[0]])!r})"
    # The trained tokens are exactly what the model writes: its text, its tool call, its end markers.
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == ("Let me compute.<|python_start|>12*34<|python_end|>It is 408.<|assistant_end|>"
                       "You're welcome.<|assistant_end|>")
    # Truncation cuts both lists at the same place.
    short_ids, short_mask = tok.render_conversation(_tool_conversation(), max_tokens=12)
    assert short_ids == ids[:12] and short_mask == mask[:12]


def test_render_user_parts_and_no_system(tok):
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    assert tok.render_conversation(parts) == tok.render_conversation(plain)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "assistant", "content": "a"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "alternate"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "alternate"),
    ([{"role": "tool", "content": "a"}], "unknown role"),
    ([], "non-empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "python_output"),
])
def test_render_rejects_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(messages)


def test_render_for_completion(tok):
    msgs = _tool_conversation()
    prompt = tok.render_for_completion(msgs)
    history, _ = tok.render_conversation(msgs[:-1], max_tokens=None)
    assert prompt == history + [tok.encode_special("<|assistant_start|>")]
    assert tok.render_for_completion(msgs[:-1]) == prompt  # a chat ending in the user's turn primes the same way
    assert prompt[0] == tok.bos_id and tok.decode(prompt).endswith("Thanks!<|user_end|><|assistant_start|>")
    with pytest.raises(ValueError, match="user turn"):
        tok.render_for_completion([])


def test_capped_texts():
    docs = ["a" * 50, "b" * 5, "c" * 50, "d" * 50]
    out = list(tokenizer_cli.capped_texts(iter(docs), max_chars=70, doc_cap=30))
    assert out == ["a" * 30, "b" * 5, "c" * 30, "d" * 5]
    assert sum(map(len, out)) == 70


def test_cli_eval_builtin_samples(tok, tmp_path, capsys):
    path = tmp_path / "tok.json"
    tok.save(path)
    tokenizer_cli.main(["eval", "--tokenizer", str(path)])
    out = capsys.readouterr().out
    ratios = tokenizer_cli.compression_table({"ours": tok.encode}, tokenizer_cli.SAMPLES)
    for name, text in tokenizer_cli.SAMPLES.items():
        assert ratios[name]["ours"] == pytest.approx(len(text.encode()) / len(tok.encode(text)))
        assert f"{ratios[name]['ours']:.2f}" in out


def test_cli_eval_missing_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="fastchat tokenizer train"):
        tokenizer_cli.main(["eval", "--tokenizer", str(tmp_path / "none.json")])


def test_cli_train_then_eval(data_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = _docs(data_dir, 40)
    for name, chunk in (("a.jsonl", docs[:30]), ("b.jsonl", docs[30:])):
        (corpus / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk))
    out = tmp_path / "tok" / "tokenizer.json"
    tokenizer_cli.main(["train", "--data", str(corpus), "--vocab-size", "400", "--out", str(out)])
    trained = Tokenizer.load(out)
    assert trained.vocab_size == 400 and trained.decode(trained.encode(docs[0])) == docs[0]
    tokenizer_cli.main(["eval", "--tokenizer", str(out), "--data", str(corpus)])
    printed = capsys.readouterr().out
    assert "held-out (b.jsonl)" in printed and "saved to" in printed

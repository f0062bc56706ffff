"""Data pipeline: reading every format and split, BOS-aligned packing, rank sharding, exact resume."""
import collections
import gc
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastchat_core import data
from fastchat_core.data import DataLoader, iter_texts


class ByteTokenizer:
    """UTF-8 bytes as ids, BOS = 256: the interface of fastchat_core.tokenizer.Tokenizer that the loader uses."""
    bos_id = 256

    def encode(self, texts, prepend=None):
        return [([] if prepend is None else [prepend]) + list(t.encode()) for t in texts]


class WordTokenizer:
    """Documents are whitespace-separated integers, each its own id; BOS = 0. With every integer used once in a
    corpus, a token names the document and position it came from."""
    bos_id = 0

    def encode(self, texts, prepend=None):
        return [([] if prepend is None else [prepend]) + [int(w) for w in t.split()] for t in texts]


def write(path: Path, fmt: str, docs: list[str], row_group_size: int = 4):
    """One file of docs in the given format (txt formats hold a single document)."""
    if fmt == "parquet":
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=row_group_size)
    elif fmt in ("jsonl", "jsonl.gz"):
        body = "".join(json.dumps({"text": d, "source": "test"}) + "\n" for d in docs).encode()
        path.write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)
    else:
        assert len(docs) == 1
        body = docs[0].encode()
        path.write_bytes(gzip.compress(body) if fmt.endswith(".gz") else body)


def number_corpus(root: Path, fmt: str, files: int, docs_per_file: int, seed: int = 0, max_words: int = 40):
    """Files of documents made of distinct integers; returns the documents as token lists, in file order."""
    rng = random.Random(seed)
    next_word, all_docs = 1, []
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        docs = []
        for _ in range(docs_per_file):
            n = rng.randint(1, max_words)
            docs.append(list(range(next_word, next_word + n)))
            next_word += n
        write(root / f"shard_{f:03d}.{fmt}", fmt, [" ".join(map(str, d)) for d in docs])
        all_docs += docs
    return all_docs


def rows_of(batch):
    """The (B, T+1) rows behind (inputs, targets), after checking that targets are inputs shifted by one."""
    x, y = batch
    assert x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], dim=1)


def segments(row, bos):
    """A row cut before each BOS, BOS dropped: the documents (or pieces of long ones) it holds, in order."""
    assert row[0] == bos, "rows must start with BOS"
    out = []
    for t in row:
        if t == bos:
            out.append([])
        else:
            out[-1].append(t)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl.gz"])
def test_iter_texts_formats_and_split(tmp_path, fmt):
    files = [[f"file {f} doc {i} " + "x" * i for i in range(5 + f)] for f in range(3)]
    for f, docs in enumerate(files):
        write(tmp_path / f"part{f}.{fmt}", fmt, docs, row_group_size=2)
    assert list(iter_texts(tmp_path)) == files[0] + files[1] + files[2]
    assert list(iter_texts(tmp_path, split="train")) == files[0] + files[1]
    assert list(iter_texts(tmp_path, split="val")) == files[2]
    assert list(iter_texts(tmp_path / f"part1.{fmt}")) == files[1]


def test_txt_gz_one_document_per_file(tmp_path):
    docs = [f"document {i}\n\nsecond paragraph of {i}\n" for i in range(4)]
    for i, d in enumerate(docs):
        write(tmp_path / f"{i:02d}.txt.gz", "txt.gz", [d])
    assert list(iter_texts(tmp_path)) == docs
    assert list(iter_texts(tmp_path, split="val")) == docs[-1:]


def test_big_txt_is_split_at_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TXT_DOC_CHARS", 50)
    blocks = [f"block {i} line one\nblock {i} line two" for i in range(6)]
    (tmp_path / "book.txt").write_text("\n\n\n".join(blocks) + "\n")
    (tmp_path / "short.txt").write_text("short\n\nfile")  # under the limit: one document, blank line kept
    assert list(iter_texts(tmp_path)) == blocks + ["short\n\nfile"]


def test_single_file_is_split_99_to_1(tmp_path):
    docs = [f"doc {i}" for i in range(250)]
    write(tmp_path / "only.jsonl.gz", "jsonl.gz", docs)
    val = list(iter_texts(tmp_path, split="val"))
    train = list(iter_texts(tmp_path, split="train"))
    assert val == [d for i, d in enumerate(docs) if i % 100 == 99]
    assert len(val) == 2 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert list(iter_texts(tmp_path / "only.jsonl.gz", split="val")) == val  # a file path behaves the same


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_texts(tmp_path / "nope"))
    (tmp_path / "readme.md").write_text("not data")
    with pytest.raises(ValueError, match="no data files"):
        list(iter_texts(tmp_path))
    with pytest.raises(ValueError, match="split must be"):
        list(iter_texts(tmp_path, split="test"))
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_texts(tmp_path / "a.parquet"))
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="b.jsonl line 2"):
        list(iter_texts(tmp_path / "b.jsonl"))


def test_real_pretrain_shards(data_dir):
    pretrain = Path(data_dir) / "pretrain"
    with gzip.open(sorted(pretrain.glob("*.jsonl.gz"))[0], "rt") as f:
        first = json.loads(f.readline())["text"]
    assert next(iter_texts(pretrain, split="train")) == first
    val = list(itertools.islice(iter_texts(pretrain, split="val"), 3))
    assert len(val) == 3 and all(isinstance(t, str) and len(t) >= 200 for t in val)  # README: >= 200 chars
    assert first not in val


# ---------------------------------------------------------------------------------------------------------
# Packing


def test_rows_hold_whole_documents_and_row_sized_pieces(tmp_path):
    docs = number_corpus(tmp_path, "parquet", files=2, docs_per_file=30)
    where = {w: (k, i) for k, d in enumerate(docs) for i, w in enumerate(d)}
    T = 15  # a row of 16 holds BOS + 15 words: longer documents come as pieces of 15 words, each after a BOS
    loader = DataLoader(WordTokenizer(), tmp_path, B=3, T=T, split=None, buffer_docs=6, tokenizer_batch=4)
    seen_piece = seen_crop = False
    for batch in itertools.islice(loader, 8):
        assert batch[0].shape == (3, T)
        for row in rows_of(batch).tolist():
            segs = segments(row, WordTokenizer.bos_id)
            for j, seg in enumerate(segs):
                last = j == len(segs) - 1
                if not seg:  # a lone BOS: a piece cropped to its first token
                    assert last
                    seen_crop = True
                    continue
                k, i = where[seg[0]]
                whole = docs[k][i:i + T]
                assert i % T == 0, "a segment must start a document or one of its row-sized pieces"
                assert seg == whole[:len(seg)], "a segment must be one contiguous run of its document"
                assert last or seg == whole, "only the segment that ends a row may be cropped"
                seen_piece |= i > 0
                seen_crop |= len(seg) < len(whole)
    assert seen_piece and seen_crop  # both paths ran
    loader.close()


def test_best_fit_takes_the_largest_that_fits_and_crops_the_shortest(tmp_path):
    sizes = [6, 3, 2, 8, 5]  # words; with BOS the documents are 7, 4, 3, 9 and 6 tokens, in file order
    starts = [1 + sum(sizes[:k]) for k in range(len(sizes))]
    docs = [list(range(s, s + n)) for s, n in zip(starts, sizes)]
    write(tmp_path / "d.jsonl", "jsonl", [" ".join(map(str, d)) for d in docs])
    loader = DataLoader(WordTokenizer(), tmp_path, B=1, T=9, split=None, buffer_docs=10, tokenizer_batch=10, epochs=1)
    rows = [rows_of(b)[0].tolist() for b in loader]
    # row 1: the 9 fits, then nothing fits the 1 left: the shortest (3) is cropped to its BOS
    # row 2: the 7, then the shortest of 4 and 6 is cropped to the 3 left; the 6 alone cannot fill row 3
    assert rows == [[0] + docs[3] + [0], [0] + docs[0] + [0] + docs[1][:2]]
    assert loader.stats() == {"docs": 5, "tokens": 29, "used": 20, "cropped": 2 + 1 + 6, "epoch": 0}


def test_closing_or_dropping_a_loader_stops_its_thread(tmp_path):
    number_corpus(tmp_path, "jsonl", files=1, docs_per_file=200)
    for drop in (False, True):
        before = set(threading.enumerate())
        loader = DataLoader(WordTokenizer(), tmp_path, B=1, T=7, split=None, buffer_docs=4)
        next(loader)
        (thread,) = set(threading.enumerate()) - before
        if drop:
            del loader
            gc.collect()
        else:
            loader.close()
            with pytest.raises(RuntimeError, match="closed"):
                next(loader)
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl.gz"])
def test_no_token_lost_or_duplicated_across_ranks(tmp_path, fmt):
    docs = number_corpus(tmp_path, fmt, files=3, docs_per_file=25)
    T = 15
    # every word once, and a BOS per piece: a document of n words comes as ceil(n / T) pieces
    corpus = collections.Counter(w for d in docs for w in d)
    corpus[WordTokenizer.bos_id] = sum(-(-len(d) // T) for d in docs)
    where = {w: k for k, d in enumerate(docs) for w in d}
    for world in (1, 2, 3):
        kept, docs_of_rank, stats = collections.Counter(), [], []
        for rank in range(world):
            loader = DataLoader(WordTokenizer(), tmp_path, B=2, T=T, split=None, rank=rank, world_size=world,
                                buffer_docs=5, tokenizer_batch=3, epochs=1)
            rows = [rows_of(b) for b in loader]
            mine = collections.Counter(t for r in rows for t in r.flatten().tolist())
            kept += mine
            docs_of_rank.append({where[t] for t in mine if t != WordTokenizer.bos_id})
            stats.append(loader.stats())
            assert stats[-1]["used"] == sum(mine.values()) == len(rows) * 2 * (T + 1)
        assert not kept - corpus, "a token was duplicated"
        assert sum((corpus - kept).values()) == sum(s["cropped"] for s in stats), "lost tokens != reported"
        assert sum(s["tokens"] for s in stats) == sum(corpus.values())  # every document read exactly once
        assert sum(s["docs"] for s in stats) == len(docs)
        for a, b in itertools.combinations(docs_of_rank, 2):
            assert not a & b, "a document appeared on two ranks"
        # both paths ran, else the test would prove little
        assert sum(s["cropped"] for s in stats) > 0 and sum(s["used"] for s in stats) > 0


def test_exact_resume_mid_stream_and_across_epochs(tmp_path):
    number_corpus(tmp_path, "parquet", files=2, docs_per_file=20)  # ~40 docs: a few batches per epoch
    kw = dict(B=2, T=23, split=None, rank=1, world_size=2, buffer_docs=6, tokenizer_batch=4)
    loader = DataLoader(WordTokenizer(), tmp_path, **kw)
    first = [rows_of(b) for b in itertools.islice(loader, 3)]
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON round trip
    assert state["pending"], "resume should be tested with documents still buffered"
    rest = [rows_of(b) for b in itertools.islice(loader, 12)]
    assert loader.stats()["epoch"] >= 1, "the compared stretch should cross an epoch boundary"
    resumed = DataLoader(WordTokenizer(), tmp_path, **dict(kw, B=1), state=state)  # B may change
    again = [rows_of(b) for b in itertools.islice(resumed, 24)]
    assert torch.equal(torch.cat(again), torch.cat(rest))
    assert resumed.stats() == loader.stats()
    fresh = DataLoader(WordTokenizer(), tmp_path, **kw)
    assert torch.equal(torch.cat([rows_of(b) for b in itertools.islice(fresh, 3)]), torch.cat(first))
    for l in (loader, resumed, fresh):
        l.close()


def test_state_from_other_settings_is_refused(tmp_path):
    number_corpus(tmp_path, "jsonl", files=2, docs_per_file=10)
    loader = DataLoader(WordTokenizer(), tmp_path, B=1, T=7, split=None, rank=0, world_size=2, buffer_docs=4)
    next(loader)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(ValueError, match=r"world_size=2 \(now 3\)"):
        DataLoader(WordTokenizer(), tmp_path, B=1, T=7, split=None, rank=0, world_size=3, buffer_docs=4, state=state)


def test_epochs_wrap_with_one_note(tmp_path, capsys):
    number_corpus(tmp_path, "jsonl.gz", files=1, docs_per_file=12, max_words=10)
    loader = DataLoader(WordTokenizer(), tmp_path, B=2, T=7, split=None, buffer_docs=3, tokenizer_batch=2)
    epochs = set()
    for _ in itertools.islice(loader, 40):
        epochs.add(loader.state_dict()["epoch"])
    loader.close()
    assert {0, 1, 2} <= epochs
    assert capsys.readouterr().out.count("starting epoch") == 1


def test_errors_reach_the_training_loop(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "1 2 3"}\n{"oops": 1}\n')
    loader = DataLoader(WordTokenizer(), tmp_path, B=1, T=3, split=None, buffer_docs=4)
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        next(loader)
    number_corpus(tmp_path / "few", "jsonl", files=1, docs_per_file=1)
    loader = DataLoader(WordTokenizer(), tmp_path / "few", B=1, T=3, split=None, rank=1, world_size=2)
    with pytest.raises(ValueError, match="no documents for rank 1 of 2"):
        next(loader)


def test_interpreter_exit_does_not_wait_for_the_thread(tmp_path):
    number_corpus(tmp_path, "jsonl", files=1, docs_per_file=500)
    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from test_data import WordTokenizer\n"
        "from fastchat_core.data import DataLoader\n"
        "loader = DataLoader(WordTokenizer(), sys.argv[1], B=1, T=7, split=None, buffer_docs=4)\n"
        "next(loader)\n"
        "print('ok')\n"  # exits with the thread blocked on a full queue
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_loader_on_real_data(data_dir):
    pretrain = Path(data_dir) / "pretrain"
    firsts = [t.encode() for t in itertools.islice(iter_texts(pretrain, split="train"), 40)]
    loader = DataLoader(ByteTokenizer(), pretrain, B=2, T=64, split="train", buffer_docs=8, tokenizer_batch=8)
    for batch in itertools.islice(loader, 3):
        assert batch[0].shape == (2, 64)
        for row in rows_of(batch).tolist():
            for seg in segments(row, ByteTokenizer.bos_id):  # each is a run of one of the first documents
                assert any(bytes(seg) in doc for doc in firsts)
    s = loader.stats()
    assert s["used"] == 3 * 2 * 65 and s["tokens"] >= s["used"] + s["cropped"]
    loader.close()


@pytest.mark.gpu
def test_cuda_batches_match_cpu(tmp_path):
    number_corpus(tmp_path, "parquet", files=2, docs_per_file=30)
    kw = dict(B=2, T=15, split=None, buffer_docs=6, tokenizer_batch=4)
    cpu = DataLoader(WordTokenizer(), tmp_path, **kw)
    gpu = DataLoader(WordTokenizer(), tmp_path, device="cuda", **kw)
    for (x, y), (gx, gy) in zip(itertools.islice(cpu, 5), itertools.islice(gpu, 5)):
        assert gx.is_cuda and gy.is_cuda and gx.is_contiguous() and gy.is_contiguous()
        assert torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    cpu.close()
    gpu.close()


def test_download_resumes_after_a_dropped_connection(tmp_path, monkeypatch):
    """A local HTTP server drops the first transfer halfway; the retry asks only for the tail (Range)."""
    import http.server

    blob = os.urandom(300_000)
    ranges = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path != "/shard_00000.parquet":
                self.send_error(404)
                return
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else 0
            ranges.append(start)
            body = blob[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # the first transfer stops halfway, as a flaky network would
            self.wfile.write(body if len(ranges) > 1 else body[: len(body) // 2])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(data.time, "sleep", lambda s: None)  # no backoff waits in the test
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        (path,) = data.download_shards(url, ["shard_00000.parquet"], tmp_path, retries=3)
        assert path.read_bytes() == blob
        assert ranges == [0, len(blob) // 2]  # the retry resumed where the first transfer broke off
        data.download_shards(url, ["shard_00000.parquet"], tmp_path)  # complete: nothing fetched again
        assert len(ranges) == 2
        with pytest.raises(RuntimeError, match="HTTP 404"):
            data.download_shards(url, ["missing.parquet"], tmp_path)
        assert not (tmp_path / "missing.parquet").exists()
    finally:
        server.shutdown()

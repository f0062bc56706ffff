"""Pretraining data: read text shards, tokenize ahead in a thread, pack BOS-aligned rows per rank, resume exactly.

Sources are a folder (searched recursively, files sorted by path) or one file of:
  .parquet            a `text` column, read one row group at a time (the FineWeb-Edu shard layout)
  .jsonl / .jsonl.gz  one JSON object per line with a `text` field
  .txt / .txt.gz      one document per file; a file over TXT_DOC_CHARS characters (a book, a dump) is instead
                      split at blank lines, one document per block, so that a multi-gigabyte file is streamed
                      rather than held and tokenized as one string, and documents start at paragraph starts
A file that cannot be read as its name says (not UTF-8, a truncated .gz, a bad JSON line, a damaged parquet file)
raises DataError naming the file and the line, byte or row group where reading failed.
Splits: "train" is every file but the last, "val" the last file. With a single file there is no file to hold
out, so its documents are split 99:1 instead: every 100th document (index 99, 199, ...) is validation. The
interleaving needs no document count up front, which a stream does not have.

Packing (DataLoader): each row holds T+1 tokens and starts with a BOS, and a document that fits a row is never
split across rows, so its every token is trained with the document's beginning in context. Rows are filled by
best fit from a buffer of tokenized documents: the largest one that fits the remaining room; when none fits,
the shortest is cropped to the room and the rest of it is DISCARDED (nanochat's rule: kept as a continuation,
it would sit in a later row without its beginning, which is what BOS alignment avoids). A document longer than
a row cannot be in context whole anyway, so it enters the buffer as row-sized pieces: its first T+1 tokens,
then runs of T tokens, each after a BOS of its own (the only tokens the loader adds). Cropping whole long
documents instead would waste most of a corpus like ours: on the bundled pretrain/ shards, with bytes // 4 as
a stand-in for BPE tokens and rows of 2048, a third of the documents are longer than a row and their tails
are 54% of all tokens, so no epoch would ever show the ends of long documents. As built, 2% of the tokens
read are discarded there (buffer_docs=1000); stats() counts them.

(Over 400 lines: reading, packing and the loader's exact-resume state share one position format — file, unit,
document — so they are kept together.)
"""
import bisect
import collections
import copy
import gzip
import io
import itertools
import json
import os
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
import weakref
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fastchat_core.common import DataError

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt", ".txt.gz")
TXT_DOC_CHARS = 100_000  # a .txt file up to this size is one document; a bigger one is split at blank lines
VAL_EVERY = 100  # single-file data: document i is validation when i % VAL_EVERY == VAL_EVERY - 1
PREFETCH = 4  # packed batches the background thread keeps ready

# Public pretraining shards for online users. nanochat trains on FineWeb-Edu 100BT, re-shuffled into parquet
# shards shard_00000.parquet ... shard_01822.parquet (the last one is its validation shard). E.g.:
#   src = DEFAULT_SOURCES["fineweb-edu-100b"]
#   download_shards(src["base_url"], [src["pattern"].format(i) for i in range(8)], "data/fineweb")
DEFAULT_SOURCES = {
    "fineweb-edu-100b": {
        "base_url": "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        "pattern": "shard_{:05d}.parquet",
        "shards": 1823,
    },
}


# ----------------------------------------------------------------------------------------------------------
# Reading documents


FIX = "repair or download the file again, or move it out of the data folder"


def list_files(path) -> list[Path]:
    """The data files of a folder (recursively, sorted by path), or the one file named."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist: check --data or FASTCHAT_DATA")
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"{path} is not a data file: its name must end in one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise ValueError(f"no data files ({', '.join(SUFFIXES)}) under {path}: point it at a folder of shards")
    return files


def _split(path, split):
    """(files, keep) for a split, where keep(i) says whether document i of a file belongs to it."""
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    files = list_files(path)
    if split is None:
        return files, lambda i: True
    if len(files) > 1:
        return (files[:-1] if split == "train" else files[-1:]), lambda i: True
    if split == "train":
        return files, lambda i: i % VAL_EVERY != VAL_EVERY - 1
    return files, lambda i: i % VAL_EVERY == VAL_EVERY - 1


def _open_text(path, mode="rt"):
    if path.name.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8" if mode == "rt" else None)
    return open(path, mode, encoding="utf-8" if mode == "rt" else None)


def _unreadable(path, error) -> DataError:
    """The DataError for a text file that failed to decode (`error`). Text mode cannot say where, so on this error
    path only the file is read again as bytes to find the line and byte of the invalid UTF-8 or of the cut."""
    line, offset, carry = 1, 0, b""  # where `data` starts (in the uncompressed text)
    try:
        with _open_text(path, "rb") as f:
            while True:
                chunk = f.read1(1 << 20)  # read1: a .gz cut short still hands over what it decompressed
                data, carry = carry + chunk, b""
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as e:
                    if not chunk or e.end < len(data):
                        line, offset = line + data.count(b"\n", 0, e.start), offset + e.start
                        problem = f"invalid UTF-8 ({e.reason}): convert the file to UTF-8, or {FIX}"
                        break
                    data, carry = data[:e.start], data[e.start:]  # a character cut by the chunk's end
                if not chunk:  # it decodes now: the file changed while it was read
                    return DataError(f"{path}: {error}: {FIX}")
                line, offset = line + data.count(b"\n"), offset + len(data)
    except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz
        problem = f"{e}: {FIX}"
    uncompressed = " of the uncompressed text" if path.name.endswith(".gz") else ""
    return DataError(f"{path} line {line}, byte {offset}{uncompressed}: {problem}")


def _parquet_docs(path, start, owns):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: its footer (the file's last bytes) is unreadable ({e}): {FIX}") from None
    with pf:
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        first = 0  # index of the row group's first row within the file
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if first + n > start and owns(group):  # a rank decodes only its own row groups
                try:
                    texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
                except (pa.ArrowException, OSError) as e:
                    col = pf.metadata.row_group(group).column(0)
                    at = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                    raise DataError(f"{path} row group {group} (from byte {at}) is unreadable ({e}): {FIX}") from None
                for i in range(max(start - first, 0), n):
                    yield first + i, texts[i]
            first += n


def _jsonl_docs(path, start, owns):
    with _open_text(path) as f:
        for i, line in enumerate(f):
            if i < start or not owns(i) or not line.strip():
                continue  # other ranks' lines are never parsed
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path} line {i + 1}: expected a JSON object with a 'text' field ({e!r})") from None
            if text is not None and not isinstance(text, str):
                raise DataError(f"{path} line {i + 1}: 'text' must be a string, got {type(text).__name__}")
            yield i, text


def _txt_blocks(path):
    """The whole file as one document, or its blank-line separated blocks when it is over TXT_DOC_CHARS."""
    with _open_text(path) as f:
        head = f.read(TXT_DOC_CHARS + 1)
        if len(head) <= TXT_DOC_CHARS:
            yield head
            return
        block = []
        # finish the line in progress, then stream the rest: a dump may be gigabytes
        for line in itertools.chain(io.StringIO(head + f.readline()), f):
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")


def _txt_docs(path, start, owns):
    for i, text in enumerate(_txt_blocks(path)):
        if i >= start and owns(i):
            yield i, text


def _docs(path, start=0, owns=lambda unit: True):
    """(index, text) of a file's documents from index `start` on, for the units that `owns` accepts.

    A unit is what a rank takes whole: a row group for parquet, a document otherwise. Empty documents are
    skipped (they would be a lone BOS) but keep their index, so indices stay positions in the file.
    """
    name = path.name
    reader = _parquet_docs if name.endswith(".parquet") else _jsonl_docs if ".jsonl" in name else _txt_docs
    try:
        for i, text in reader(path, start, owns):
            if text:
                yield i, text
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _unreadable(path, e) from None


def iter_texts(path, split=None):
    """The documents (str) of a folder or file, in file order; split None, "train" or "val" (module docstring)."""
    files, keep = _split(path, split)
    for file in files:
        for i, text in _docs(file):
            if keep(i):
                yield text


# ----------------------------------------------------------------------------------------------------------
# Downloading


def download_shards(base_url, names, dest_dir, retries=5):
    """Fetch base_url/<name> into dest_dir for each name; returns the local paths.

    Bytes go to <name>.part; a retry (exponential backoff) or a later run asks only for the missing tail with an
    HTTP Range request. A finished file is renamed into place atomically, so a file present under its final
    name is complete and is skipped.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = dest / name
        url = f"{base_url.rstrip('/')}/{name}"
        for attempt in range(1, retries + 1):
            if path.exists():
                break
            try:
                _fetch(url, path)
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500 and e.code not in (408, 429):  # asking again will not help
                    raise RuntimeError(f"cannot download {url}: HTTP {e.code} {e.reason}; check the URL") from e
                error = e
            except (OSError, ValueError) as e:  # network trouble (URLError is an OSError) or a short read
                error = e
            else:
                break
            if attempt == retries:
                raise RuntimeError(f"gave up on {url} after {retries} tries ({error}); run again to resume") from error
            wait = min(2 ** attempt, 60)
            print(f"download {name}: {error}; retrying in {wait}s ({attempt}/{retries - 1})", flush=True)
            time.sleep(wait)
        paths.append(path)
    return paths


def _fetch(url, path):
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "fastchat-core"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        total = e.headers.get("Content-Range", "").rpartition("/")[2]
        if total in (str(have), "", "*"):  # asked past the end: the .part is whole
            os.replace(part, path)
            return
        part.unlink()
        raise ValueError(f"{part} is longer than the file on the server; starting over") from None
    with resp:
        if have and resp.status != 206:  # the server ignored the Range header: start over
            have = 0
        if resp.status == 206:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        else:
            total = resp.headers.get("Content-Length", "")
        with open(part, "ab" if have else "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
    size = part.stat().st_size
    if total.isdigit() and size != int(total):
        raise ValueError(f"connection closed after {size} of {total} bytes")
    os.replace(part, path)


# ----------------------------------------------------------------------------------------------------------
# Packing


class _Packer:
    """This rank's documents -> BOS-aligned rows of T+1 tokens. Runs in the loader's thread.

    Its whole state is plain ints: the reader cursor (epoch, file, next document index), the counters, and the
    (file, doc, piece) names of the buffered pieces, which are re-read and re-tokenized on resume. The buffer is
    kept sorted by (length, file, doc, piece), so best fit is a bisect and the order rebuilds from the names.
    """

    def __init__(self, tokenizer, files, keep, row_len, rank, world_size, buffer_docs, tokenizer_batch, epochs,
                 state):
        self.tokenizer, self.files, self.keep, self.row_len = tokenizer, files, keep, row_len
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.buffer_docs, self.tokenizer_batch = buffer_docs, tokenizer_batch
        self.epoch, self.file, self.doc = state["epoch"], state["file"], state["doc"]
        self.counts = dict(state["stats"])
        self.pending = state["pending"]
        self.keys, self.tokens = [], []  # sorted (length, file, doc, piece) and the matching token arrays
        self.stream = self._stream(self.epoch, self.file, self.doc)
        self.ended = False
        self.noted = False

    def owns(self, file):
        """Unit u of file f belongs to rank (f + u) % world_size: a pure function of the position, so resuming
        needs no counts of earlier files, and folders of one-document files still spread over the ranks."""
        return lambda unit: (file + unit) % self.world_size == self.rank

    def _stream(self, epoch, file, doc):
        """(epoch, file, doc, text) of this rank from the cursor on, wrapping into the next epoch."""
        while True:
            found = False
            for f in range(file, len(self.files)):
                for i, text in _docs(self.files[f], doc if f == file else 0, self.owns(f)):
                    if self.keep(i):
                        found = True
                        yield epoch, f, i, text
            if not found and file == 0 and doc == 0:
                raise ValueError(f"no documents for rank {self.rank} of {self.world_size} in {len(self.files)} "
                                 f"file(s) starting {self.files[0]}: use fewer ranks or more/larger files")
            epoch, file, doc = epoch + 1, 0, 0
            if self.epochs is not None and epoch >= self.epochs:
                return
            if not self.noted and self.rank == 0:
                print(f"data: ran out of documents in {self.files[0].parent}, starting epoch {epoch} "
                      f"(later epochs are not announced; see state_dict()['epoch'])", flush=True)
            self.noted = True

    def _pieces(self, ids):
        """A tokenized document as pieces that fit a row: itself, or when longer than a row its first row_len
        tokens, then the rest in runs of row_len - 1, each after a BOS of its own."""
        ids = np.asarray(ids, dtype=np.int64)
        n = self.row_len
        pieces = [ids[:n]]
        for s in range(n, len(ids), n - 1):
            pieces.append(np.concatenate(([self.tokenizer.bos_id], ids[s:s + n - 1])))
        return pieces

    def _add(self, name, piece):
        key = (len(piece), *name)
        i = bisect.bisect_right(self.keys, key)
        self.keys.insert(i, key)
        self.tokens.insert(i, piece)

    def _encode(self, texts):
        return self.tokenizer.encode(texts, prepend=self.tokenizer.bos_id)

    def restore(self):
        """Re-read and re-tokenize the buffered pieces named by the state."""
        pieces = collections.defaultdict(list)  # (file, doc) -> its buffered piece numbers
        for f, d, p in self.pending:
            pieces[f, d].append(p)
        texts = {}
        for f in sorted({f for f, _ in pieces}):
            left = {d for g, d in pieces if g == f}
            for i, text in _docs(self.files[f], min(left), self.owns(f)):
                if i in left:
                    texts[f, i] = text
                    left.discard(i)
                    if not left:
                        break
        missing = [name for name in pieces if name not in texts]
        if missing:
            raise ValueError(f"loader state names documents (file, index) {missing[:3]} that are not in the data: "
                             "resume with the data the state was saved with")
        names = list(pieces)
        for s in range(0, len(names), self.tokenizer_batch):
            chunk = names[s:s + self.tokenizer_batch]
            for name, ids in zip(chunk, self._encode([texts[n] for n in chunk])):
                doc_pieces = self._pieces(ids)
                for p in pieces[name]:
                    self._add((*name, p), doc_pieces[p])

    def _refill(self):
        """Tokenize the next tokenizer_batch documents into the buffer; False once the data has ended."""
        chunk = list(itertools.islice(self.stream, self.tokenizer_batch))
        if not chunk:
            return False
        for (_, f, d, _), ids in zip(chunk, self._encode([c[3] for c in chunk])):
            for p, piece in enumerate(self._pieces(ids)):
                self._add((f, d, p), piece)
                self.counts["tokens"] += len(piece)
        self.counts["docs"] += len(chunk)
        self.epoch, self.file, self.doc = chunk[-1][0], chunk[-1][1], chunk[-1][2] + 1
        return True

    def _fill_row(self, row):
        """Fill row by best fit; returns how many tokens went in (less than the row only when data ended)."""
        pos, n = 0, len(row)
        while pos < n:
            while len(self.keys) < self.buffer_docs and not self.ended:
                self.ended = not self._refill()
            if not self.keys:
                break
            room = n - pos
            i = bisect.bisect_right(self.keys, (room, float("inf"))) - 1  # largest that fits
            if i < 0:
                i = 0  # none fits: crop the shortest, which wastes the least
            self.keys.pop(i)
            ids = self.tokens.pop(i)
            take = min(len(ids), room)
            row[pos:pos + take] = ids[:take]
            self.counts["cropped"] += len(ids) - take
            pos += take
        return pos

    def next_batch(self, B):
        """(B, T+1) int64 rows, or None when a finite run is over (its last, incomplete batch is dropped)."""
        rows = np.empty((B, self.row_len), dtype=np.int64)
        for b in range(B):
            got = self._fill_row(rows[b])
            if got < self.row_len:
                self.counts["cropped"] += b * self.row_len + got
                return None
        self.counts["used"] += B * self.row_len
        return rows

    def snapshot(self):
        return {"epoch": self.epoch, "file": self.file, "doc": self.doc,
                "pending": [list(key[1:]) for key in self.keys], "stats": dict(self.counts)}


def _produce(packer, B, pin, out, stop):
    """Loader thread: pack batches ahead into `out` with the state after each; errors go to the consumer."""

    def put(item):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    try:
        packer.restore()
        while True:
            rows = packer.next_batch(B)
            if rows is None:
                put(("end", packer.snapshot()))
                return
            # inputs and targets as two contiguous halves of one tensor: one host-to-device copy
            batch = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]))
            if pin:
                batch = batch.pin_memory()
            if not put(("batch", batch, packer.snapshot())):
                return
    except BaseException as e:  # handed over, so the training loop raises it instead of waiting forever
        put(("error", e))


def _stop_thread(stop, thread):
    stop.set()
    if thread is not threading.current_thread():  # a garbage collection may run on the thread itself
        thread.join(timeout=10)


class DataLoader:
    """Distributed, resumable pretraining loader: iterate for (inputs, targets), LongTensors (B, T) on device.

    Each rank reads only its share of the data (row groups of parquet, documents otherwise; see _Packer.owns)
    and packs BOS-aligned rows of T+1 tokens by best fit from a buffer of buffer_docs documents (or pieces of
    long ones), tokenized tokenizer_batch at a time (module docstring). A daemon thread reads, tokenizes and
    packs up to PREFETCH batches ahead, so the training loop does not wait for it; close(), dropping the
    loader or interpreter exit stops it.

    state_dict() names the position after the last batch handed out; DataLoader(..., state=that) continues with
    exactly the batches this loader would have produced. It must be resumed with the same data, T, rank,
    world_size, split, buffer_docs and tokenizer_batch (checked); B may change. epochs=None loops forever,
    starting over with the epoch counter raised; epochs=n stops after n passes (e.g. a full validation pass),
    dropping the last incomplete batch, whose tokens are counted as cropped.
    """

    def __init__(self, tokenizer, path, B, T, split="train", rank=0, world_size=1, device="cpu", buffer_docs=1000,
                 tokenizer_batch=128, state=None, epochs=None):
        for name, value in (("B", B), ("T", T), ("world_size", world_size), ("buffer_docs", buffer_docs),
                            ("tokenizer_batch", tokenizer_batch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None (forever) or >= 1, got {epochs}")
        files, keep = _split(path, split)
        self.device = torch.device(device)
        settings = {"files": len(files), "split": split, "T": T, "rank": rank, "world_size": world_size,
                    "buffer_docs": buffer_docs, "tokenizer_batch": tokenizer_batch}
        if state is None:
            state = {"epoch": 0, "file": 0, "doc": 0, "pending": [],
                     "stats": {"docs": 0, "tokens": 0, "used": 0, "cropped": 0}}
        else:
            wrong = {k: (state.get(k), v) for k, v in settings.items() if state.get(k) != v}
            if wrong:
                diffs = ", ".join(f"{k}={saved!r} (now {now!r})" for k, (saved, now) in wrong.items())
                raise ValueError(f"loader state was saved with {diffs}: resume with the same data and settings")
        self._state = {**settings, **copy.deepcopy(state)}
        packer = _Packer(tokenizer, files, keep, T + 1, rank, world_size, buffer_docs, tokenizer_batch, epochs,
                         self._state)
        self._queue = queue.Queue(maxsize=PREFETCH)
        self._stop = threading.Event()
        self._done = False
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        # The thread gets the packer, not self, so an abandoned loader can be collected. The finalizer stops the
        # thread then, or at interpreter exit, before teardown can kill it inside a C extension call.
        self._thread = threading.Thread(target=_produce, args=(packer, B, pin, self._queue, self._stop),
                                        name="fastchat-data", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_thread, self._stop, self._thread)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._stop.is_set():
            raise RuntimeError("this DataLoader was closed; make a new one (state=old.state_dict() to resume)")
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data loader thread stopped without a word") from None
        if item[0] == "error":
            self._done = True
            raise item[1]
        if item[0] == "end":
            self._state.update(item[1])
            self._done = True
            raise StopIteration
        _, batch, position = item
        self._state.update(position)
        batch = batch.to(self.device, non_blocking=True)
        return batch[0], batch[1]

    def state_dict(self) -> dict:
        """Where this loader is, as JSON-serializable plain data (a few ints per buffered document)."""
        return copy.deepcopy(self._state)

    def stats(self) -> dict:
        """Counts up to the last batch handed out: documents read, tokens read (with the BOS of each piece), tokens
        used in rows, tokens cropped (ends of cropped documents, and the dropped last batch of a finite run).
        tokens - used - cropped are in the buffer."""
        return dict(self._state["stats"], epoch=self._state["epoch"])

    def close(self):
        """Stop the thread (it finishes the batch it is packing first); also done on garbage collection and at exit."""
        self._finalizer()

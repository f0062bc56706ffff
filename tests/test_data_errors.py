"""Unreadable data files: each fails with a DataError naming the file and the line and byte (or the parquet row
group) where reading failed, from iter_texts and from the DataLoader's thread alike."""
import gzip
import json
import random
import re
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastchat_core.data import DataError, DataLoader, iter_texts
from test_data import ByteTokenizer


def jsonl(n):
    return "".join(json.dumps({"text": f"document {i}: café"}, ensure_ascii=False) + "\n" for i in range(n)).encode()


def position(error):
    """(line, byte) that a DataError names."""
    line, byte = re.search(r" line (\d+), byte (\d+)", str(error)).groups()
    return int(line), int(byte)


@pytest.mark.parametrize("name", ["junk.txt", "junk.jsonl", "junk.txt.gz", "junk.jsonl.gz"])
def test_binary_file(tmp_path, name):
    body = bytes(range(256)) * 4  # a newline at byte 10; byte 128 is the first that is not UTF-8
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    with pytest.raises(DataError, match=re.escape(f"{path} line 2, byte 128") + ".*invalid UTF-8.*convert the file"):
        list(iter_texts(path))


def test_invalid_utf8_in_jsonl(tmp_path):
    good, bad = jsonl(3), '{"text": "café"}\n'.encode("latin-1")  # the é as one byte: not UTF-8
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + bad + jsonl(2))
    with pytest.raises(DataError) as e:
        list(iter_texts(path))
    assert str(e.value).startswith(str(path)) and isinstance(e.value, ValueError)
    assert position(e.value) == (4, len(good) + bad.index(b"\xe9"))


def test_invalid_utf8_in_a_big_txt_past_characters_cut_between_reads(tmp_path):
    """A 1.5 MB book (split into blocks, streamed) whose first 1 MiB read ends inside a 2-byte character, which is
    no error; the one bad byte after it is found at its exact line and byte."""
    body = b"xx" + ("é" * 99 + "\n").encode() * 8000
    assert body[1 << 20] & 0xC0 == 0x80  # a continuation byte
    at = body.index(b"\n", 1_200_000) + 1  # a line's start
    body = body[:at] + b"\xff" + body[at:]
    path = tmp_path / "book.txt"
    path.write_bytes(body)
    with pytest.raises(DataError) as e:
        list(iter_texts(path))
    assert position(e.value) == (body[:at].count(b"\n") + 1, at)
    assert "invalid start byte" in str(e.value)


def test_truncated_jsonl_gz(tmp_path):
    body = jsonl(3000)
    cut = gzip.compress(body)
    cut = cut[:len(cut) // 2]
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    with pytest.raises(DataError, match="of the uncompressed text: Compressed file ended") as e:
        list(iter_texts(path))
    line, byte = position(e.value)
    assert byte == len(zlib.decompressobj(wbits=31).decompress(cut))  # everything the cut stream still holds
    assert 0 < byte < len(body) and line == body[:byte].count(b"\n") + 1
    # the training loader reads in a thread and hands the same error over
    loader = DataLoader(ByteTokenizer(), path, B=2, T=31, split=None, buffer_docs=8, tokenizer_batch=8, epochs=1)
    with pytest.raises(DataError, match=re.escape(f"{path} line {line}, byte {byte}")):
        for _ in loader:
            pass


def test_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(jsonl(3))
    with pytest.raises(DataError, match=re.escape(f"{path} line 1, byte 0") + ".*Not a gzipped file"):
        list(iter_texts(path))


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(2) + b"{not json}\n" + jsonl(1))
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: expected a JSON object")):
        list(iter_texts(path))
    body = jsonl(5)
    path.write_bytes(body[:-10])  # cut inside the last line
    with pytest.raises(DataError, match=re.escape(f"{path} line 5: expected a JSON object")):
        list(iter_texts(path))


def test_bad_parquet(tmp_path):
    docs = [f"document {i} " * 20 for i in range(8)]
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": docs}), good, row_group_size=4)
    body = good.read_bytes()

    path = tmp_path / "bad.parquet"
    for junk in (random.Random(0).randbytes(2000), body[:len(body) // 2]):  # not parquet; cut short
        path.write_bytes(junk)
        with pytest.raises(DataError, match=re.escape(f"{path}: its footer") + ".*unreadable"):
            list(iter_texts(path))

    # a damaged page header in row group 1: group 0 is read, then the error names group 1 and where it starts
    col = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    damaged = bytearray(body)
    for i in range(col.data_page_offset, col.data_page_offset + 8):
        damaged[i] ^= 0xFF
    path.write_bytes(bytes(damaged))
    read = []
    with pytest.raises(DataError, match=re.escape(f"{path} row group 1 (from byte {start}) is unreadable")):
        for text in iter_texts(path):
            read.append(text)
    assert read == docs[:4]

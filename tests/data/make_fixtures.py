"""Build the test suite's own small data folder (tests/data/) from the full data set.

    python tests/data/make_fixtures.py [SOURCE]      # SOURCE defaults to $FASTCHAT_DATA

SOURCE is a folder laid out like ../shared/data (see its README.md). The output, written next to this script,
has the same layout and formats with a few items of every file, so that every CPU test runs from a plain clone
(tests/conftest.py points FASTCHAT_DATA here when it is unset). The generated files are committed; run this
again only when the selection below changes. The output is byte-for-byte reproducible (gzip without a
timestamp or file name), and tests/test_full_data.py checks, when FASTCHAT_DATA names the full set, that the
committed files are exactly what this script makes from it.

What is kept (in file order; lines copied verbatim unless said otherwise):
  pretrain/shard_00{0..5}  the first 40 documents of each shard, each cut to at most 1500 characters at a
                           whitespace (documents stay >= 200 characters; lines re-serialized as the source is)
  chat/*                   the first 100 (self_instruct_human_written) or 50 conversations; for SGD the first
                           24 of its train split, 6 of dev and 2 of test, so that every split has some
  gsm8k/{train,test}       the first 20 problems
  mmlu/dev                 the first 3 subjects, whole (5 five-shot exemplars each: abstract_algebra, anatomy,
                           astronomy)
  mmlu/test                the first 2 questions of each of the 57 subjects
  arc/*                    the first 20 questions
  humaneval                the first 12 problems, plus 32, 33, 38 and 50 (tests that call the entry point by
                           name, prompts with helper functions), which the sandboxed judge must also pass
  core/*.jsonl.gz          the first 12 items of each task (10-shot tasks need 11 others)
  core/core_tasks.json     all 22 entries as in the source, with `records` set to the counts kept here
"""
import gzip
import io
import itertools
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PRETRAIN_DOCS, PRETRAIN_CHARS = 40, 1500
CHAT = {"self_instruct_human_written": 100, "gpteacher_codegen": 50, "taskmaster4_coffee": 50}
SGD_SPLITS = {"train": 24, "dev": 6, "test": 2}
GSM8K, ARC, CORE = 20, 20, 12
MMLU_DEV_SUBJECTS, MMLU_TEST_PER_SUBJECT = 3, 2
HUMANEVAL_FIRST, HUMANEVAL_EXTRA = 12, (32, 33, 38, 50)


def read_lines(path: Path, n: int | None = None) -> list[bytes]:
    """The first n lines (all when None) of a .jsonl.gz file, each with its newline."""
    with gzip.open(path, "rb") as f:
        return list(itertools.islice(f, n))


def dumps(record: dict) -> bytes:
    """One JSON line as the source files write them: UTF-8, with U+2028, U+2029 and U+0085 escaped."""
    text = json.dumps(record, ensure_ascii=False)
    for ch, esc in (("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\u0085")):
        text = text.replace(ch, esc)
    return (text + "\n").encode("utf-8")


def write_gz(out: Path, rel: str, lines: list[bytes]) -> int:
    """Write out/rel, a reproducible .gz (no timestamp, no file name in the header); returns its record count."""
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(b"".join(lines))
    path.write_bytes(buf.getvalue())
    return len(lines)


def cut(text: str, limit: int) -> str:
    """The text, or its first `limit` characters ended at the last whitespace within them."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    at = max(head.rfind("\n"), head.rfind(" "))
    return head[:at] if at >= limit // 2 else head


def build(src: Path, out: Path = HERE) -> dict[str, int]:
    """Write the fixtures made from the data folder src under out; returns {path under out: records}."""
    counts = {}
    for shard in sorted((src / "pretrain").glob("shard_*.jsonl.gz")):
        docs = []
        for line in read_lines(shard, PRETRAIN_DOCS):
            doc = json.loads(line)
            doc["text"] = cut(doc["text"], PRETRAIN_CHARS)
            assert len(doc["text"]) >= 200
            docs.append(dumps(doc))
        counts[f"pretrain/{shard.name}"] = write_gz(out, f"pretrain/{shard.name}", docs)

    for name, n in CHAT.items():
        rel = f"chat/{name}.jsonl.gz"
        counts[rel] = write_gz(out, rel, read_lines(src / rel, n))
    kept, taken = [], dict.fromkeys(SGD_SPLITS, 0)
    for line in read_lines(src / "chat" / "sgd_dialogues.jsonl.gz"):
        split = json.loads(line)["split"]
        if taken[split] < SGD_SPLITS[split]:
            taken[split] += 1
            kept.append(line)
    counts["chat/sgd_dialogues.jsonl.gz"] = write_gz(out, "chat/sgd_dialogues.jsonl.gz", kept)

    for split in ("train", "test"):
        counts[f"gsm8k/{split}.jsonl.gz"] = write_gz(out, f"gsm8k/{split}.jsonl.gz",
                                                     read_lines(src / "gsm8k" / f"{split}.jsonl.gz", GSM8K))

    dev, subjects = [], []
    for line in read_lines(src / "mmlu" / "dev.jsonl.gz"):
        subject = json.loads(line)["subject"]
        if subject not in subjects:
            subjects.append(subject)
        if len(subjects) <= MMLU_DEV_SUBJECTS:
            dev.append(line)
    counts["mmlu/dev.jsonl.gz"] = write_gz(out, "mmlu/dev.jsonl.gz", dev)
    test, per_subject = [], {}
    for line in read_lines(src / "mmlu" / "test.jsonl.gz"):
        subject = json.loads(line)["subject"]
        per_subject[subject] = per_subject.get(subject, 0) + 1
        if per_subject[subject] <= MMLU_TEST_PER_SUBJECT:
            test.append(line)
    counts["mmlu/test.jsonl.gz"] = write_gz(out, "mmlu/test.jsonl.gz", test)

    for name in ("arc_easy_test", "arc_challenge_test"):
        rel = f"arc/{name}.jsonl.gz"
        counts[rel] = write_gz(out, rel, read_lines(src / rel, ARC))

    lines = read_lines(src / "humaneval" / "HumanEval.jsonl.gz", max(HUMANEVAL_EXTRA) + 1)
    keep = sorted(set(range(HUMANEVAL_FIRST)) | set(HUMANEVAL_EXTRA))
    counts["humaneval/HumanEval.jsonl.gz"] = write_gz(out, "humaneval/HumanEval.jsonl.gz", [lines[i] for i in keep])

    manifest = json.loads((src / "core" / "core_tasks.json").read_text(encoding="utf-8"))
    written = {}
    for task in manifest["tasks"]:
        if task.get("present") and task.get("file"):
            if task["file"] not in written:
                written[task["file"]] = write_gz(out, task["file"], read_lines(src / task["file"], CORE))
            task["records"] = written[task["file"]]
    counts.update(written)
    manifest["note"] = (f"Test fixture made by tests/data/make_fixtures.py: the first {CORE} items of each task; "
                        "`records` counts them. Full data set: " + manifest["note"])
    (out / "core").mkdir(parents=True, exist_ok=True)
    (out / "core" / "core_tasks.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    return counts


def data_files(folder: Path) -> list[Path]:
    """The data files of a fixture folder (not this script or the README)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".jsonl.gz", ".json")))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = argv[0] if argv else os.environ.get("FASTCHAT_DATA")
    if not src or not (Path(src) / "core" / "core_tasks.json").is_file():
        raise SystemExit("usage: make_fixtures.py SOURCE (or set FASTCHAT_DATA): a folder laid out like ../shared/data")
    if Path(src).resolve() == HERE:
        raise SystemExit("SOURCE is the fixture folder itself: point it at the full data set")
    counts = build(Path(src))
    total = sum(p.stat().st_size for p in data_files(HERE))
    print(f"wrote {len(counts) + 1} files ({sum(counts.values())} records, {total / 1024:.0f} KiB) to {HERE}")


if __name__ == "__main__":
    main()

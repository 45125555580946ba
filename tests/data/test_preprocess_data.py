"""tools/preprocess_data.py end to end on a slice of the Python standard library's source."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import preprocess_data  # tools/ is on pytest's pythonpath (pyproject.toml)
import pytest

from longctx_megatron.data.indexed_dataset import IndexedDataset
from longctx_megatron.data.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]


def stdlib_documents(count: int = 40) -> list[str]:
    """Real text every machine has: source files of the standard library, in a stable order."""
    folder = Path(json.__file__).resolve().parents[1]
    files = sorted(p for p in folder.glob("*.py") if p.stat().st_size < 60_000)[:count]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_jsonl(path: Path, records, gz: bool = False) -> None:
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record))
            handle.write("\n")


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_end_to_end_matches_in_process_tokenisation(tmp_path):
    documents = stdlib_documents()
    write_jsonl(tmp_path / "part1.jsonl", [{"text": d, "id": i} for i, d in enumerate(documents[:25])])
    write_jsonl(tmp_path / "part2.jsonl.gz", [{"text": d} for d in documents[25:]], gz=True)
    result = run_tool("--input", str(tmp_path / "part*"), "--json-keys", "text", "--tokenizer-type", "ByteTokenizer",
                      "--output-prefix", str(tmp_path / "out" / "corpus"), "--append-eod", "--workers", "2",
                      "--log-interval", "10")
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr and "MB/s" in result.stderr and "ETA" in result.stderr
    dataset = IndexedDataset(str(tmp_path / "out" / "corpus_text_document"))
    tokenizer = ByteTokenizer()
    assert len(dataset) == len(documents) and len(dataset.document_indices) == len(documents) + 1
    assert dataset.dtype == np.uint16  # smallest dtype for a 257-token vocabulary
    for index, text in enumerate(documents):
        np.testing.assert_array_equal(dataset[index], tokenizer.encode(text) + [tokenizer.eod])
    assert dataset.num_tokens == sum(len(tokenizer.encode(d)) + 1 for d in documents)
    assert not list((tmp_path / "out").glob("*.tmp*"))


def _args(tmp_path, *extra):
    return preprocess_data.parse_args([
        "--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "ByteTokenizer",
        "--output-prefix", str(tmp_path / "out"), "--append-eod", "--workers", "1", *extra,
    ])


def test_one_and_two_workers_write_identical_files(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in stdlib_documents(12)])
    outputs = []
    for workers in ("1", "2"):
        args = _args(tmp_path, "--workers", workers)
        args.output_prefix = str(tmp_path / f"w{workers}")
        preprocess_data.preprocess(args, log=lambda *_: None)
        outputs.append([Path(f"{args.output_prefix}_text_document{s}").read_bytes() for s in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


def test_worker_pool_is_shut_down_when_the_run_ends(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in stdlib_documents(6)])
    preprocess_data.preprocess(_args(tmp_path, "--workers", "2"), log=lambda *_: None)
    assert multiprocessing.active_children() == []  # joined, not left to exit with the process
    monkeypatch.setattr(preprocess_data, "_record", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        preprocess_data.preprocess(_args(tmp_path, "--workers", "2"), log=lambda *_: None)
    assert multiprocessing.active_children() == []


def test_bad_lines_are_skipped_counted_and_reported(tmp_path):
    good = [{"text": d} for d in stdlib_documents(30)]
    write_jsonl(tmp_path / "in.jsonl", good[:10] + ["{not json"] + good[10:20] + [{"title": "no text"}, {"text": ""}]
                + good[20:])
    lines = []
    stats = preprocess_data.preprocess(_args(tmp_path, "--max-bad-fraction", "0.1"), log=lines.append)
    assert (stats.documents, stats.bad, stats.empty) == (31, 2, 1)
    report = "\n".join(lines)
    assert f"{tmp_path / 'in.jsonl'}:11: malformed JSON" in report
    assert f"{tmp_path / 'in.jsonl'}:22: missing key 'text'" in report
    assert "2 bad line(s) | 1 empty document(s), kept as documents without sequences" in report
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(dataset) == 30 and len(dataset.document_indices) == 32  # the empty document has no sequence


def test_too_many_bad_lines_fail_and_write_nothing(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, "garbage", "[1, 2]", {"text": "also fine"}])
    with pytest.raises(ValueError, match=r"2 of 4 lines were bad \(50.00% > "
                                         r"--max-bad-fraction 0.10%\)"):
        preprocess_data.preprocess(_args(tmp_path), log=lambda *_: None)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def _gzip_bytes(lines: list[str]) -> bytes:
    return gzip.compress("".join(line + "\n" for line in lines).encode())


_FIFTY = _gzip_bytes(['{"text": "ok"}'] * 50)


@pytest.mark.parametrize("name,contents,line,reason", [
    ("surrogate.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n', 2,
     "key 'text' is not valid Unicode (a lone surrogate at character 1)"),
    ("nested.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", 2,
     "malformed JSON (nested too deeply)"),
    ("truncated.jsonl.gz", _FIFTY[:-8], 51, "truncated (Compressed file ended before the end-of-stream marker"),
    ("plain.jsonl.gz", '{"text": "ok"}\n', 1, "not gzip or damaged (Not a gzipped file"),
    ("damaged.jsonl.gz", _FIFTY[:-8] + bytes(8), 51, "not gzip or damaged (CRC check failed"),
], ids=["lone-surrogate", "deeply-nested", "truncated-gzip", "not-gzip", "gzip-crc"])
def test_a_bad_line_of_any_kind_is_counted_with_its_file_and_line_and_the_run_goes_on(tmp_path, name, contents,
                                                                                          line, reason):
    bad = tmp_path / name
    bad.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    write_jsonl(tmp_path / "good.jsonl", [{"text": d} for d in stdlib_documents(4)])
    args = _args(tmp_path, "--max-bad-fraction", "0.5")
    args.input = [str(bad), str(tmp_path / "good.jsonl")]
    lines = []
    stats = preprocess_data.preprocess(args, log=lines.append)
    assert stats.bad == 1 and stats.documents >= 4
    assert f"{bad}:{line}: {reason}" in "\n".join(lines)
    assert len(IndexedDataset(str(tmp_path / "out_text_document"))) == stats.documents


def test_a_null_tokenizer_word_that_is_not_an_id_is_a_bad_line(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}, {"text": "4 five 6"}, {"text": "7 99"}, {"text": "8"}])
    args = preprocess_data.parse_args(["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "NullTokenizer",
                                       "--vocab-size", "50", "--output-prefix", str(tmp_path / "out"),
                                       "--max-bad-fraction", "0.5", "--workers", "1"])
    lines = []
    stats = preprocess_data.preprocess(args, log=lines.append)
    report = "\n".join(lines)
    assert (stats.documents, stats.bad) == (2, 2)
    assert "in.jsonl:2: key 'text': NullTokenizer: 'five' is not an integer token id" in report
    assert "in.jsonl:3: key 'text': NullTokenizer: token id 99 is outside [0, 51)" in report
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [dataset[i].tolist() for i in range(2)] == [[1, 2, 3], [8]]


def test_batches_are_bounded_by_bytes_as_well_as_lines():
    items = [("f", number, b"x" * size) for number, size in enumerate([10, 10, 10, 100, 5, 5, 5, 5], start=1)]
    batches = list(preprocess_data._batches(iter(items), max_lines=3, max_bytes=25))
    assert [[number for _, number, _ in batch] for batch in batches] == [[1, 2], [3], [4], [5, 6, 7], [8]]
    assert [item for batch in batches for item in batch] == items  # every line once, in order


def test_temporaries_of_a_killed_run_are_removed_and_a_running_ones_kept(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in stdlib_documents(3)])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    leftovers = [tmp_path / f"out_text_document.bin.tmp-{dead_pid}", tmp_path / f"out_text_document.idx.tmp-{dead_pid}"]
    kept = [tmp_path / f"out_text_document.bin.tmp-{live_pid}", tmp_path / "out_text_document.bin.tmp-notes",
            tmp_path / "other.bin.tmp-1"]
    for path in leftovers + kept:
        path.write_bytes(b"partial")
    preprocess_data.preprocess(_args(tmp_path), log=lambda *_: None)
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)


def test_interrupted_run_leaves_no_index(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in stdlib_documents(10)])
    calls = []

    def interrupted(line):
        calls.append(line)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(line)

    original = preprocess_data.encode_line
    monkeypatch.setattr(preprocess_data, "encode_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_data.preprocess(_args(tmp_path), log=lambda *_: None)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_input_errors(tmp_path):
    result = run_tool("--input", str(tmp_path / "missing*.jsonl"), "--tokenizer-type", "ByteTokenizer",
                      "--output-prefix", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 1 and "matches no file" in result.stderr
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    result = run_tool("--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "SentencePieceTokenizer",
                      "--output-prefix", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 1 and "--tokenizer-model" in result.stderr
    assert not list(tmp_path.glob("out*"))

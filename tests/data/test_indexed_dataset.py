"""Megatron MMIDIDX indexed dataset: writer/reader round trips, the exact on-disk bytes, merging (API and
CLI), and one clear error per kind of damaged file."""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from longctx_megatron.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    data_file_path,
    dataset_exists,
    index_file_path,
    optimal_dtype,
)

REPO = Path(__file__).resolve().parents[2]
MERGE_SCRIPT = REPO / "tools" / "merge_datasets.py"

# Megatron's dtype code table, written out independently of the implementation.
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}

# Three documents of several sequences, including an empty sequence and an empty document.
DOCUMENTS = [
    [[1, 2, 3], [4], []],
    [],
    [[5, 6], [7, 8, 9, 10]],
]


def _build(prefix, documents, dtype=np.int32) -> str:
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for document in documents:
        builder.add_document(document)
    builder.finalize(index_file_path(prefix))
    return str(prefix)


def _load_merge_script():
    spec = importlib.util.spec_from_file_location("merge_datasets_script", MERGE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_dataset(a: IndexedDataset, b: IndexedDataset) -> None:
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a.sizes, b.sizes)
    np.testing.assert_array_equal(a.pointers, b.pointers)
    np.testing.assert_array_equal(a.document_indices, b.document_indices)
    assert Path(data_file_path(a.prefix)).read_bytes() == Path(data_file_path(b.prefix)).read_bytes()
    assert Path(index_file_path(a.prefix)).read_bytes() == Path(index_file_path(b.prefix)).read_bytes()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda t: np.dtype(t).name)
def test_round_trip_every_dtype(tmp_path, dtype):
    prefix = _build(tmp_path / "ds", DOCUMENTS, dtype)
    assert dataset_exists(prefix)
    ds = IndexedDataset(prefix)
    sequences = [s for document in DOCUMENTS for s in document]

    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == len(sequences) == 5
    assert ds.num_tokens == 10
    assert ds.sizes.dtype == np.int32 and ds.pointers.dtype == np.int64 and ds.document_indices.dtype == np.int64
    assert ds.sizes.tolist() == [3, 1, 0, 2, 4]
    itemsize = np.dtype(dtype).itemsize
    assert ds.pointers.tolist() == [0, 3 * itemsize, 4 * itemsize, 4 * itemsize, 6 * itemsize]
    assert ds.document_indices.tolist() == [0, 3, 3, 5]
    for i, expected in enumerate(sequences):
        item = ds[i]
        assert item.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(item, np.array(expected, dtype=dtype))
    np.testing.assert_array_equal(ds[-1], np.array([7, 8, 9, 10], dtype=dtype))
    assert [s.tolist() for s in ds[1:4]] == [[4], [], [5, 6]]
    assert [s.tolist() for s in ds[::2]] == [[1, 2, 3], [], [7, 8, 9, 10]]
    np.testing.assert_array_equal(ds.get(4, offset=1, length=2), np.array([8, 9], dtype=dtype))
    np.testing.assert_array_equal(ds.get(4, offset=3), np.array([10], dtype=dtype))
    assert ds.get(4, offset=4).size == 0
    assert Path(data_file_path(prefix)).read_bytes() == np.arange(1, 11, dtype=dtype).tobytes()


def test_add_item_accepts_lists_arrays_and_tensors(tmp_path):
    prefix = tmp_path / "ds"
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=np.uint16)
    builder.add_item([1, 2])
    builder.add_item(np.array([3, 4], dtype=np.int64))
    builder.add_item(torch.tensor([5, 65535]))
    builder.end_document()
    builder.finalize(index_file_path(prefix))
    ds = IndexedDataset(str(prefix))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3, 4], [5, 65535]]


def test_add_item_rejects_values_the_dtype_cannot_hold(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "ds.bin"), dtype=np.uint16)
    with pytest.raises(ValueError, match=r"span \[-1, 3\], outside the range of uint16"):
        builder.add_item([-1, 3])
    with pytest.raises(ValueError, match=r"span \[0, 65536\]"):
        builder.add_item(np.array([0, 65536]))
    with pytest.raises(TypeError, match="float64"):
        builder.add_item([1.5])
    with pytest.raises(ValueError, match="1-D"):
        builder.add_item([[1, 2]])
    with pytest.raises(ValueError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "other.bin"), dtype=np.float16)


def test_empty_dataset_round_trips(tmp_path):
    prefix = _build(tmp_path / "empty", [])
    ds = IndexedDataset(prefix)
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.document_indices.tolist() == [0]
    only_empty = IndexedDataset(_build(tmp_path / "blank", [[[]]]))
    assert len(only_empty) == 1 and only_empty[0].size == 0


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(50257) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32


def test_out_of_range_reads_raise_index_error(tmp_path):
    ds = IndexedDataset(_build(tmp_path / "ds", DOCUMENTS))
    with pytest.raises(IndexError, match="out of range for a dataset of 5 sequences"):
        ds[5]
    with pytest.raises(IndexError, match="sequence 0 of 3 tokens"):
        ds.get(0, offset=2, length=2)
    with pytest.raises(TypeError):
        ds[1.0]


# ---------------------------------------------------------------- exact bytes


def test_idx_bytes_match_the_format_spec(tmp_path):
    prefix = _build(tmp_path / "ds", [[[10, 11, 12], [13]], [[14, 15]]], np.uint16)
    expected = b"MMIDIDX\x00\x00"
    expected += struct.pack("<Q", 1)  # version
    expected += struct.pack("<B", 8)  # dtype code: uint16
    expected += struct.pack("<Q", 3)  # sequence count
    expected += struct.pack("<Q", 3)  # document count: documents + 1
    expected += struct.pack("<3i", 3, 1, 2)  # sizes
    expected += struct.pack("<3q", 0, 6, 8)  # pointers: byte offsets (2 bytes per token)
    expected += struct.pack("<3q", 0, 2, 3)  # document indices
    assert Path(index_file_path(prefix)).read_bytes() == expected
    assert Path(data_file_path(prefix)).read_bytes() == struct.pack("<6H", 10, 11, 12, 13, 14, 15)


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=lambda t: np.dtype(t).name)
def test_dtype_code_in_header(tmp_path, dtype):
    prefix = _build(tmp_path / "ds", [[[1]]], dtype)
    assert Path(index_file_path(prefix)).read_bytes()[17] == DTYPE_CODES[dtype]


def test_finalize_leaves_no_temporary_files(tmp_path):
    _build(tmp_path / "ds", DOCUMENTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


# ---------------------------------------------------------------- memory mapping


def test_reader_memory_maps_both_files(tmp_path):
    ds = IndexedDataset(_build(tmp_path / "ds", DOCUMENTS))
    for array_ in (ds.sizes, ds.pointers, ds.document_indices):
        assert isinstance(array_, np.memmap)
        assert not array_.flags.writeable
    item = ds[0]
    assert not item.flags.owndata and not item.flags.writeable  # a view into the mapped .bin, not a copy
    assert ds.get(4, offset=1, length=2).base is not None


def test_opening_a_huge_sparse_bin_does_not_read_it(tmp_path):
    """A 4 GiB .bin (sparse: no disk) whose last sequence is at its very end opens and reads instantly."""
    prefix = tmp_path / "huge"
    total_tokens = 1 << 30  # int32 tokens: 4 GiB
    with open(data_file_path(prefix), "wb") as stream:
        stream.seek(total_tokens * 4 - 8)
        stream.write(struct.pack("<2i", 7, 9))
    sizes = [total_tokens - 2, 2]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 2)
    idx += struct.pack("<2i", *sizes) + struct.pack("<2q", 0, sizes[0] * 4) + struct.pack("<2q", 0, 2)
    Path(index_file_path(prefix)).write_bytes(idx)
    ds = IndexedDataset(str(prefix))
    assert ds.num_tokens == total_tokens
    assert ds[1].tolist() == [7, 9]
    assert ds.get(0, offset=5, length=3).tolist() == [0, 0, 0]


def test_pickle_keeps_only_the_prefix(tmp_path):
    ds = IndexedDataset(_build(tmp_path / "ds", DOCUMENTS))
    payload = pickle.dumps(ds)
    assert len(payload) < 500
    clone = pickle.loads(payload)
    assert clone[4].tolist() == [7, 8, 9, 10] and isinstance(clone.sizes, np.memmap)


# ---------------------------------------------------------------- merging


SHARDS = [DOCUMENTS[:1], DOCUMENTS[1:], [[[20, 21]], [[22], [23, 24]]]]


def _write_shards(directory: Path, dtype=np.int32) -> list[str]:
    directory.mkdir(exist_ok=True)
    return [_build(directory / f"shard_{k}", shard, dtype) for k, shard in enumerate(SHARDS)]


def _reference(tmp_path, dtype=np.int32) -> IndexedDataset:
    return IndexedDataset(_build(tmp_path / "reference", [d for shard in SHARDS for d in shard], dtype))


def test_add_index_equals_writing_everything_at_once(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    merged = tmp_path / "merged"
    builder = IndexedDatasetBuilder(data_file_path(merged))
    for shard in shards:
        builder.add_index(shard)
    builder.finalize(index_file_path(merged))
    _assert_same_dataset(IndexedDataset(str(merged)), _reference(tmp_path))


def test_add_index_mixed_with_add_document(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    merged = tmp_path / "merged"
    builder = IndexedDatasetBuilder(data_file_path(merged))
    builder.add_index(shards[0])
    for document in SHARDS[1]:
        builder.add_document(document)
    builder.add_index(shards[2])
    builder.finalize(index_file_path(merged))
    _assert_same_dataset(IndexedDataset(str(merged)), _reference(tmp_path))


def test_add_index_rejects_a_dtype_mismatch(tmp_path):
    shard = _build(tmp_path / "shard", DOCUMENTS, np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "out.bin"), dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match=r"dtype mismatch: .*shard\.idx holds uint16 .*out\.bin .*int32"):
        builder.add_index(shard)


def test_add_index_needs_the_open_document_closed(tmp_path):
    shard = _build(tmp_path / "shard", DOCUMENTS)
    builder = IndexedDatasetBuilder(str(tmp_path / "out.bin"))
    builder.add_item([1])
    with pytest.raises(ValueError, match="end_document"):
        builder.add_index(shard)


def test_cli_merges_a_directory_in_sorted_order(tmp_path):
    _write_shards(tmp_path / "shards")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    assert _load_merge_script().main(["--input", str(tmp_path / "shards"), "--output-prefix", str(out)]) == 0
    _assert_same_dataset(IndexedDataset(str(out)), _reference(tmp_path))
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.bin", "merged.idx"]


def test_cli_merges_explicit_prefixes_in_the_order_given(tmp_path):
    shards = _write_shards(tmp_path / "shards")
    out = tmp_path / "merged"
    argv = ["--input", shards[2], shards[0] + ".idx", shards[1], "--output-prefix", str(out)]
    assert _load_merge_script().main(argv) == 0
    reversed_docs = SHARDS[2] + SHARDS[0] + SHARDS[1]
    _assert_same_dataset(IndexedDataset(str(out)), IndexedDataset(_build(tmp_path / "ref", reversed_docs)))


def test_cli_runs_as_a_script(tmp_path):
    _write_shards(tmp_path / "shards")
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, str(MERGE_SCRIPT), "--input", str(tmp_path / "shards"), "--output-prefix", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "merged 3 datasets" in result.stdout and "5 documents" in result.stdout
    _assert_same_dataset(IndexedDataset(str(out)), _reference(tmp_path))


def test_cli_dtype_mismatch_names_both_files(tmp_path, capsys):
    a = _build(tmp_path / "a", DOCUMENTS, np.int32)
    b = _build(tmp_path / "b", DOCUMENTS, np.uint16)
    out = tmp_path / "merged"
    assert _load_merge_script().main(["--input", a, b, "--output-prefix", str(out)]) == 1
    error = capsys.readouterr().err
    assert "dtype mismatch" in error and "a.idx holds int32" in error and "b.idx holds uint16" in error
    assert not dataset_exists(str(out)) and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.bin",
        "a.idx",
        "b.bin",
        "b.idx",
    ]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no .bin/.idx pairs found"),
        (lambda d: (d / "lonely.bin").write_bytes(b""), r"lonely\.idx is missing"),
    ],
    ids=["empty-directory", "half-pair"],
)
def test_cli_input_errors(tmp_path, capsys, setup, message):
    (tmp_path / "in").mkdir()
    setup(tmp_path / "in")
    assert _load_merge_script().main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert re.search(message, capsys.readouterr().err)


def test_cli_rejects_unknown_input_and_output_among_inputs(tmp_path, capsys):
    script = _load_merge_script()
    assert script.main(["--input", str(tmp_path / "nothing"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "neither a directory nor the prefix" in capsys.readouterr().err
    shard = _build(tmp_path / "shard", DOCUMENTS)
    assert script.main(["--input", shard, "--output-prefix", shard]) == 1
    assert "is also an input" in capsys.readouterr().err


# ---------------------------------------------------------------- damaged files


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def _truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as stream:
        stream.write(data)


# name: (damage done to (idx_path, bin_path), the files the message names (the first one leading), its regex)
CORRUPTIONS = {
    "missing-idx": (lambda idx, bin_: os.remove(idx), "idx", r"missing index file"),
    "missing-bin": (lambda idx, bin_: os.remove(bin_), "bin", r"missing data file"),
    "bad-magic": (lambda idx, bin_: _patch(idx, 0, b"XXIDIDX"), "idx", r"bad magic b'XXIDIDX\\x00\\x00'"),
    "legacy-magic": (lambda idx, bin_: _patch(idx, 0, b"TNTIDX\x00\x00\x00"), "idx", r"bad magic .*legacy"),
    "empty-idx": (lambda idx, bin_: _truncate(idx, 0), "idx", r"truncated header, 0 of 34 bytes"),
    "short-header": (lambda idx, bin_: _truncate(idx, 20), "idx", r"truncated header, 20 of 34 bytes"),
    "bad-version": (lambda idx, bin_: _patch(idx, 9, struct.pack("<Q", 2)), "idx", r"unsupported version 2"),
    "bad-dtype-code": (lambda idx, bin_: _patch(idx, 17, b"\x09"), "idx", r"unknown dtype code 9"),
    "truncated-idx": (
        lambda idx, bin_: _truncate(idx, os.path.getsize(idx) - 8),
        "idx",
        r"truncated, the header claims 5 sequences and 4 document indices \(126 bytes\) but the file has 118",
    ),
    "multimodal-idx": (
        lambda idx, bin_: _append(idx, bytes(5)),
        "idx",
        r"5 bytes after the document indices \(a multimodal sequence-modes block",
    ),
    "trailing-garbage": (lambda idx, bin_: _append(idx, bytes(3)), "idx", r"3 bytes after .*garbage"),
    "doc-indices-nonmonotonic": (
        lambda idx, bin_: _patch(idx, 34 + 12 * 5 + 8, struct.pack("<q", 4)),
        "idx",
        r"document indices are not monotonic: entry 2 is 3 after entry 1 = 4",
    ),
    "doc-indices-wrong-end": (
        lambda idx, bin_: _patch(idx, 34 + 12 * 5 + 24, struct.pack("<q", 4)),
        "idx",
        r"document indices end at 4, not at the sequence count 5",
    ),
    "doc-indices-wrong-start": (
        lambda idx, bin_: _patch(idx, 34 + 12 * 5, struct.pack("<q", 1)),
        "idx",
        r"document indices must start with 0, found 1",
    ),
    "bin-partial-token": (
        lambda idx, bin_: _truncate(bin_, 39),
        "bin",
        r"39 bytes is not a whole number of int32 tokens \(4 bytes each\)",
    ),
    "bin-truncated": (
        lambda idx, bin_: _truncate(bin_, 36),
        "idx bin",
        r"sequence 4 \(byte 24, 4 tokens of int32\) lies outside .*\.bin \(36 bytes\)",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damaged_files_raise_a_clear_error(tmp_path, name):
    corrupt, named, message = CORRUPTIONS[name]
    prefix = _build(tmp_path / "ds", DOCUMENTS)
    idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
    corrupt(idx_path, bin_path)
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    paths = {"idx": idx_path, "bin": bin_path}
    assert str(error.value).startswith(paths[named.split()[0]])
    assert all(paths[file] in str(error.value) for file in named.split())
    assert isinstance(error.value, ValueError)


def test_a_bad_pointer_in_the_middle_fails_on_read(tmp_path):
    prefix = _build(tmp_path / "ds", DOCUMENTS)
    _patch(index_file_path(prefix), 34 + 4 * 5 + 8, struct.pack("<q", 1 << 40))  # pointer of sequence 1
    ds = IndexedDataset(prefix)  # the open-time check covers the last sequence only
    assert ds[0].tolist() == [1, 2, 3]
    with pytest.raises(IndexedDatasetError, match=r"ds\.idx: sequence 1 \(byte 1099511627776, .*lies outside"):
        ds[1]

"""Our safetensors writer/reader: round trip, the reference implementation reads our files, bad files are named."""

from __future__ import annotations

import pytest
import safetensors  # the reference implementation (a dev dependency)
import torch

from longctx_megatron.checkpoint.safetensors_io import (
    Deferred,
    SafetensorsError,
    SafetensorsReader,
    file_crc32,
    write_safetensors,
)

TENSORS = {
    "weight": torch.randn(3, 5),
    "half": torch.randn(4, 2).bfloat16(),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "empty": torch.empty(0, 7),
    "bytes": torch.arange(11, dtype=torch.uint8),
    "strided": torch.randn(6, 4)[:, 1],  # not contiguous
}


def test_round_trip_size_and_crc(tmp_path):
    path = str(tmp_path / "a.safetensors")
    written = write_safetensors(path, TENSORS, {"note": "x"})
    assert written.bytes == (tmp_path / "a.safetensors").stat().st_size
    assert written.crc32 == file_crc32(path)
    with SafetensorsReader(path) as reader:
        assert reader.keys() == list(TENSORS) and reader.metadata == {"note": "x"}
        for name, tensor in TENSORS.items():
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_reference_implementation_reads_our_files(tmp_path):
    path = str(tmp_path / "a.safetensors")
    write_safetensors(path, TENSORS)
    with safetensors.safe_open(path, framework="pt") as handle:
        for name, tensor in TENSORS.items():
            assert torch.equal(handle.get_tensor(name), tensor), name


def test_truncated_and_garbage_files_are_named(tmp_path):
    path = tmp_path / "a.safetensors"
    write_safetensors(str(path), TENSORS)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SafetensorsError, match=r"a\.safetensors: truncated"):
        SafetensorsReader(str(path))
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SafetensorsError, match="unreadable header"):
        SafetensorsReader(str(path))
    path.write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short"):
        SafetensorsReader(str(path))


def test_deferred_tensors_are_loaded_while_writing(tmp_path):
    path = str(tmp_path / "a.safetensors")
    loaded = []
    tensors = {name: Deferred(tuple(t.shape), t.dtype, lambda t=t, name=name: loaded.append(name) or t)
               for name, t in TENSORS.items()}
    written = write_safetensors(path, tensors)
    assert loaded == list(TENSORS) and written.crc32 == file_crc32(path)
    with SafetensorsReader(path) as reader:
        assert all(torch.equal(reader.get(name), tensor) for name, tensor in TENSORS.items())
    with pytest.raises(SafetensorsError, match="'x' loaded as \\[2\\] torch.float32, announced as \\[3\\]"):
        write_safetensors(path, {"x": Deferred((3,), torch.float32, lambda: torch.zeros(2))})

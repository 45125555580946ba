"""Our safetensors writer/reader: round trip, the reference implementation reads our files, bad files are named."""

from __future__ import annotations

import json
import struct

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


def _crafted(path, header: dict | list | str, data: bytes) -> str:
    """A file with exactly this header (JSON) and data, as someone else might write it."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return str(path)


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("change,message", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, r"tensor 'w': data_offsets \[-8, 0\]"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, r"tensor 'w': data_offsets \[8, 0\]"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "hold 8 bytes; shape \\[3\\] of F32 needs 12"),
    ({"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, "needs 16"),  # a wrong dtype is never cast
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "dtype 'Q4' is not one of"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "shape \\[-2\\] must be a list"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "shape '2' must be a list"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "tensors 'w' and 'b' overlap|'b' and 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, "exactly dtype, shape and"),
    ({"w": [0, 8]}, "tensor 'w': expected an object"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "truncated: tensor 'w' ends at byte 16"),
    ({"__metadata__": {"a": 1}}, "__metadata__ must be an object of strings"),
])
def test_crafted_headers_are_refused_before_any_data_is_read(tmp_path, change, message):
    path = _crafted(tmp_path / "x.safetensors", {**GOOD, **change}, bytes(12))
    with pytest.raises(SafetensorsError, match=message) as error:
        SafetensorsReader(path)
    assert "x.safetensors" in str(error.value)


@pytest.mark.parametrize("header", [[1, 2], "text", 3])
def test_a_header_that_is_not_an_object_is_refused(tmp_path, header):
    with pytest.raises(SafetensorsError, match="the header is a JSON .*, not an object"):
        SafetensorsReader(_crafted(tmp_path / "x.safetensors", header, b""))


def test_deeply_nested_header_is_a_named_error(tmp_path):
    path = tmp_path / "x.safetensors"
    encoded = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)
    with pytest.raises(SafetensorsError, match="unreadable header"):
        SafetensorsReader(str(path))


def test_a_valid_crafted_file_still_reads(tmp_path):
    data = torch.tensor([1.0, 2.0, 3.0]).numpy().tobytes()
    with SafetensorsReader(_crafted(tmp_path / "x.safetensors", GOOD, data)) as reader:
        assert reader.get("w").tolist() == [1.0, 2.0] and reader.get("b").tolist() == [3.0]

"""The safetensors file format, written in one streaming pass and read through a memory map.

A file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range;
optional ``__metadata__`` of strings) padded with spaces to 8 bytes, then the raw little-endian
tensor bytes. Nothing is pickled, so reading a file cannot run code. We write the format
ourselves rather than through the ``safetensors`` package so that the CRC-32 the checkpoint
manifest records is computed from memory while the bytes go out (no second read; overlapped
with the writing), and the file is
fsynced before it is reported written. The reader maps the file and returns views: only the pages
a caller slices are read, which is what lets a rank load just its part of a resharded tensor.
Files are readable by ``safetensors.safe_open`` and Hugging Face (tested).

A file may come from anyone, so the reader checks the whole header before it maps any data: a
JSON object of entries with exactly ``dtype`` (from an allow-list, never cast), ``shape``
(non-negative integers) and ``data_offsets`` (0 <= begin <= end within the data, end - begin =
the shape's bytes), no two tensors overlapping, and string-valued ``__metadata__``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
_MAX_HEADER = 100 * 2**20
_BLOCK = 16 * 2**20


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message names it."""


@dataclass(frozen=True)
class WrittenFile:
    path: str
    bytes: int
    crc32: int


@dataclass(frozen=True)
class Deferred:
    """A tensor to be produced only when its bytes are written (one at a time: bounded memory)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: object  # () -> torch.Tensor of that shape and dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()) if flat.dtype != torch.uint8 else memoryview(flat.numpy())


def write_safetensors(path: str, tensors: dict[str, torch.Tensor | Deferred], metadata: dict[str, str] | None = None
                      ) -> WrittenFile:
    """Write ``tensors`` (CPU, or Deferred) to ``path`` and fsync it; returns its size and CRC-32."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset,
                                                                                                     offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    # The CRC of block i is computed in a second thread while block i is written: both release
    # the GIL, so a rank writes at about min(disk, CRC) speed rather than 1 / (1/disk + 1/CRC).
    with ThreadPoolExecutor(1) as pool, open(path, "wb") as file:
        crc = pool.submit(zlib.crc32, prefix)
        file.write(prefix)
        for name, tensor in tensors.items():
            if isinstance(tensor, Deferred):
                loaded = tensor.load()
                if tuple(loaded.shape) != tuple(tensor.shape) or loaded.dtype != tensor.dtype:
                    raise SafetensorsError(f"{path}: {name!r} loaded as {list(loaded.shape)} {loaded.dtype}, "
                                           f"announced as {list(tensor.shape)} {tensor.dtype}")
                tensor = loaded
            view = _raw_bytes(tensor)
            for start in range(0, len(view), _BLOCK):
                block = view[start:start + _BLOCK]
                crc = pool.submit(lambda data, previous: zlib.crc32(data, previous.result()), block, crc)
                file.write(block)
            crc.result()  # the tensor's bytes may be freed once its CRC is done
        file.flush()
        os.fsync(file.fileno())
        return WrittenFile(path, len(prefix) + offset, crc.result())


def file_crc32(path: str, block: int = 16 * 2**20) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_header(path: str, header, data_size: int) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor entries) of a parsed header, every field checked against the ``data_size``
    bytes after it; a SafetensorsError names the file, the tensor and the field otherwise."""
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings")
    entries, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: expected an object with exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
            raise SafetensorsError(f"{where}: dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: shape {shape!r} must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end")
        if offsets[1] > data_size:
            raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte {offsets[1]} of the data, "
                                   f"the file has {data_size} data bytes")
        expected = math.prod(shape) * TORCH_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise SafetensorsError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes; "
                                   f"shape {shape} of {dtype} needs {expected}")
        entries[name] = entry
        if offsets[1] > offsets[0]:
            ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise SafetensorsError(f"{path}: the bytes of tensors {first!r} and {second!r} overlap")
    return metadata, entries


class SafetensorsReader:
    """Tensors of one file as views of a private (copy-on-write) memory map; nothing is read until used."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            if size < 8:
                raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file")
            (length,) = struct.unpack("<Q", file.read(8))
            if length > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{path}: header length {length} exceeds the file ({size} bytes)")
            try:
                header = json.loads(file.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
                raise SafetensorsError(f"{path}: unreadable header ({error})") from None
            self._start = 8 + length
            self.metadata, self.header = _checked_header(path, header, size - self._start)
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view of the file (copy it before the reader is closed)."""
        try:
            entry = self.header[name]
        except KeyError:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}") from None
        dtype = TORCH_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._start + begin)
        return flat.view(dtype).view(shape)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map closes when that is freed
                pass
            self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Megatron-LM's memory-mapped indexed dataset (the ``MMIDIDX`` format): writer, reader and validation.

A dataset is two files sharing a prefix. ``prefix.bin`` holds every sequence's tokens back to back in one
numpy dtype and nothing else. ``prefix.idx`` is little-endian and packed (no padding)::

    offset        bytes   field
    0             9       magic b"MMIDIDX\\x00\\x00"
    9             8       version, uint64, always 1
    17            1       dtype code of the .bin tokens, uint8 (table in ``_DTYPES``)
    18            8       sequence count N, uint64
    26            8       document count D, uint64
    34            4 N     sizes: tokens per sequence, int32
    34 + 4 N      8 N     pointers: byte offset of each sequence in the .bin, int64
    34 + 12 N     8 D     document indices, int64: 0, then the sequence count after each document,
                          so D = documents + 1, the entries never decrease and the last one is N

This is what Megatron-LM writes and reads (``megatron/core/datasets/indexed_dataset.py``: ``_IndexWriter``,
``_IndexReader``, ``IndexedDatasetBuilder``; before that ``megatron/data/indexed_dataset.py``:
``MMapIndexedDataset``), so datasets made by its ``tools/preprocess_data.py`` load here and ours load there.
Empty sequences and empty documents are legal, as in Megatron. Dtype code 7 is float32 as in Megatron-core;
the old ``megatron/data`` table decoded both 6 and 7 as float64 but its writer only ever wrote 6 for it.

Megatron-core's multimodal mode appends an int8 "sequence mode" per sequence after the document indices;
the header carries no flag for it (Megatron's reader is told out of band). We never write that block and
refuse to read an .idx that has it, since its sequences are not all text tokens.

Opening a dataset reads the 34-byte header, memory-maps both files and checks the document indices and the
last sequence against the .bin size, so opening costs O(documents) and never reads the .bin. Each read
checks its own sequence's bounds in O(1). Damaged files raise ``IndexedDatasetError`` naming the file.
"""

from __future__ import annotations

import array
import contextlib
import operator
import os
import re
import struct
from collections.abc import Iterable

import numpy as np
import torch

from longctx_megatron.atomic_file import atomic_write

_MAGIC = b"MMIDIDX\x00\x00"
_LEGACY_MAGIC = b"TNTIDX\x00\x00"  # Megatron's older non-mmap ("lazy"/"cached") index format
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count: 34 bytes
_DTYPES = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max  # sizes are stored as int32
_COPY_CHUNK = 16 << 20


class IndexedDatasetError(ValueError):
    """An indexed dataset that cannot be used: missing, damaged, or incompatible with what is asked of it."""


def data_file_path(prefix: str) -> str:
    """The token data file of the dataset at ``prefix``."""
    return f"{prefix}.bin"


def index_file_path(prefix: str) -> str:
    """The index file of the dataset at ``prefix``."""
    return f"{prefix}.idx"


def dataset_exists(prefix: str) -> bool:
    """Whether both files of the dataset at ``prefix`` exist (says nothing about their contents)."""
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65500 tokens, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _format_dtype(dtype) -> np.dtype:
    """``dtype`` as the little-endian dtype stored on disk; ValueError if the format has no code for it."""
    stored = np.dtype(dtype).newbyteorder("<")
    if stored not in _CODES:
        names = ", ".join(str(d) for d in _DTYPES.values())
        raise ValueError(f"dtype {np.dtype(dtype)} cannot be stored in an indexed dataset (supported: {names})")
    return stored


def _file_size(path: str, role: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise IndexedDatasetError(f"{path}: missing {role} file") from None


class IndexedDataset:
    """Read-only view of the dataset at ``prefix``: sequence ``i`` is ``dataset[i]`` (a 1-D array).

    Items are read-only views into the memory-mapped .bin (copy before writing to them or handing them to
    ``torch.from_numpy``). Pickling keeps only the prefix, so DataLoader workers reopen the files instead of
    copying them.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        idx_bytes = _file_size(idx_path, "index")
        with open(idx_path, "rb") as stream:
            header = stream.read(_HEADER.size)
        if header[: len(_MAGIC)] != _MAGIC[: len(header)]:
            hint = " (Megatron's legacy non-mmap index, not supported)" if header.startswith(_LEGACY_MAGIC) else ""
            raise IndexedDatasetError(f"{idx_path}: bad magic {header[: len(_MAGIC)]!r}, expected {_MAGIC!r}{hint}")
        if len(header) < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: truncated header, {len(header)} of {_HEADER.size} bytes")
        _, version, code, count, document_count = _HEADER.unpack(header)
        if version != _VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version}, expected {_VERSION}")
        if code not in _DTYPES:
            known = ", ".join(f"{c} {d}" for c, d in _DTYPES.items())
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {known})")
        expected = _HEADER.size + 12 * count + 8 * document_count
        if idx_bytes < expected:
            raise IndexedDatasetError(
                f"{idx_path}: truncated, the header claims {count} sequences and {document_count} document "
                f"indices ({expected} bytes) but the file has {idx_bytes} bytes"
            )
        if idx_bytes > expected:
            what = "a multimodal sequence-modes block, not supported" if idx_bytes == expected + count else "garbage"
            raise IndexedDatasetError(
                f"{idx_path}: {idx_bytes - expected} bytes after the document indices ({what}); "
                f"the header implies {expected} bytes"
            )

        self._dtype = _DTYPES[code]
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        start = _HEADER.size
        self._sizes = index[start : start + 4 * count].view("<i4")
        start += 4 * count
        self._pointers = index[start : start + 8 * count].view("<i8")
        start += 8 * count
        self._document_indices = index[start:expected].view("<i8")
        self._check_document_indices(idx_path, count)

        bin_bytes = _file_size(bin_path, "data")
        if bin_bytes % self._dtype.itemsize:
            raise IndexedDatasetError(
                f"{bin_path}: {bin_bytes} bytes is not a whole number of {self._dtype} tokens "
                f"({self._dtype.itemsize} bytes each); the file is truncated"
            )
        # numpy cannot map an empty file; a dataset of empty sequences has an empty .bin
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if bin_bytes else np.empty(0, np.uint8)
        if count:
            self._sequence_bytes(count - 1)

    def _check_document_indices(self, idx_path: str, count: int) -> None:
        indices = self._document_indices
        if len(indices) == 0 or indices[0] != 0:
            first = "none" if len(indices) == 0 else int(indices[0])
            raise IndexedDatasetError(f"{idx_path}: document indices must start with 0, found {first}")
        decreasing = np.flatnonzero(indices[1:] < indices[:-1])
        if len(decreasing):
            k = int(decreasing[0])
            raise IndexedDatasetError(
                f"{idx_path}: document indices are not monotonic: "
                f"entry {k + 1} is {int(indices[k + 1])} after entry {k} = {int(indices[k])}"
            )
        if indices[-1] != count:
            raise IndexedDatasetError(
                f"{idx_path}: document indices end at {int(indices[-1])}, not at the sequence count {count}"
            )

    def _sequence_bytes(self, i: int) -> tuple[int, int]:
        """Byte offset and token count of sequence ``i``, checked to lie inside the .bin."""
        pointer, size = int(self._pointers[i]), int(self._sizes[i])
        if pointer < 0 or size < 0 or pointer + size * self._dtype.itemsize > len(self._bin):
            raise IndexedDatasetError(
                f"{index_file_path(self.prefix)}: sequence {i} (byte {pointer}, {size} tokens of {self._dtype}) "
                f"lies outside {data_file_path(self.prefix)} ({len(self._bin)} bytes): "
                f"the .bin is truncated or belongs to another index"
            )
        return pointer, size

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, idx: int | slice) -> np.ndarray | list[np.ndarray]:
        """Sequence ``idx``, or a list of the sequences a slice selects."""
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when ``length`` is None)."""
        i = operator.index(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {idx} out of range for a dataset of {len(self)} sequences")
        pointer, size = self._sequence_bytes(i)
        if length is None:
            length = size - offset
        if not (0 <= offset <= size and 0 <= length <= size - offset):
            raise IndexError(f"tokens [{offset}, {offset} + {length}) out of range for sequence {i} of {size} tokens")
        start = pointer + offset * self._dtype.itemsize
        return np.asarray(self._bin[start : start + length * self._dtype.itemsize].view(self._dtype))

    @property
    def dtype(self) -> np.dtype:
        """Token dtype of the .bin."""
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence (int32, memory-mapped)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in the .bin (int64, memory-mapped)."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """Document ``d`` is sequences ``[document_indices[d], document_indices[d + 1])`` (int64, memory-mapped)."""
        return self._document_indices

    @property
    def num_tokens(self) -> int:
        """Total tokens over all sequences."""
        return int(self._sizes.sum(dtype=np.int64))

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()


class IndexedDatasetBuilder:
    """Streams sequences to ``bin_path``; ``finalize(idx_path)`` then writes the index.

    Tokens go straight to the .bin; only the index (4 bytes per sequence, 8 per document) stays in memory.
    Call ``add_item`` per sequence and ``end_document`` after each document's sequences, or ``add_document``.
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = _format_dtype(dtype)
        self.bin_path = str(bin_path)
        self._bin = open(self.bin_path, "wb")
        self._sizes = array.array("i")
        self._document_indices = array.array("q", [0])

    def add_item(self, tokens) -> None:
        """Append one sequence: a list, a 1-D numpy array or a 1-D torch tensor.

        Integer tokens that do not fit the dataset dtype raise ValueError instead of wrapping around.
        """
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        values = np.asarray(tokens)
        if values.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {values.shape}")
        if len(values) > _MAX_SEQUENCE_LENGTH:
            raise ValueError(f"a sequence holds at most {_MAX_SEQUENCE_LENGTH} tokens, got {len(values)}")
        if self.dtype.kind in "iu" and len(values):
            if values.dtype.kind not in "biu":
                raise TypeError(f"cannot store {values.dtype} values in a {self.dtype} dataset")
            low, high, info = int(values.min()), int(values.max()), np.iinfo(self.dtype)
            if low < info.min or high > info.max:
                raise ValueError(f"token values span [{low}, {high}], outside the range of {self.dtype}")
        self._bin.write(values.astype(self.dtype, copy=False).tobytes())
        self._sizes.append(len(values))

    def end_document(self) -> None:
        """Close the current document: it holds the sequences added since the previous one closed."""
        self._document_indices.append(len(self._sizes))

    def add_document(self, sequences: Iterable) -> None:
        """Append a whole document given as its sequences."""
        for sequence in sequences:
            self.add_item(sequence)
        self.end_document()

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix``, which must have this builder's dtype."""
        if self._document_indices[-1] != len(self._sizes):
            raise ValueError("call end_document() before add_index(): the current document is still open")
        source = IndexedDataset(prefix)
        if source.dtype != self.dtype:
            raise IndexedDatasetError(
                f"dtype mismatch: {index_file_path(prefix)} holds {source.dtype} tokens "
                f"but {self.bin_path} is being written as {self.dtype}"
            )
        sizes = source.sizes.astype(np.int64)
        ends = np.cumsum(sizes) * self.dtype.itemsize
        if not np.array_equal(source.pointers, ends - sizes * self.dtype.itemsize):
            raise IndexedDatasetError(
                f"{index_file_path(prefix)}: sequences are not stored back to back from the start of "
                f"{data_file_path(prefix)}, so its data cannot be appended as one block"
            )
        self._copy_bytes(data_file_path(prefix), int(ends[-1]) if len(ends) else 0)
        offset = len(self._sizes)
        self._sizes.frombytes(source.sizes.astype(np.intc).tobytes())
        self._document_indices.frombytes((source.document_indices[1:] + offset).astype(np.int64).tobytes())

    def _copy_bytes(self, path: str, nbytes: int) -> None:
        with open(path, "rb") as source:
            while nbytes:
                chunk = source.read(min(nbytes, _COPY_CHUNK))
                if not chunk:
                    raise IndexedDatasetError(f"{path}: ended {nbytes} bytes early while being copied")
                self._bin.write(chunk)
                nbytes -= len(chunk)

    def finalize(self, idx_path: str) -> None:
        """Flush the .bin to disk and write the index to ``idx_path`` atomically (temp file + rename)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.intc).astype("<i8")
        pointers = np.zeros(len(sizes), dtype="<i8")
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.frombuffer(self._document_indices, dtype=np.int64)
        header = _HEADER.pack(_MAGIC, _VERSION, _CODES[self.dtype], len(sizes), len(document_indices))
        with atomic_write(idx_path, "wb") as stream:
            stream.write(header)
            stream.write(sizes.astype("<i4").tobytes())
            stream.write(pointers.tobytes())
            stream.write(document_indices.astype("<i8").tobytes())


def remove_stale_temporaries(path: str) -> list[str]:
    """Delete ``{path}.tmp-PID`` files (``building_dataset``'s temporary names) whose process is no
    longer running on this machine: what a killed run left. Returns their paths."""
    folder, name = os.path.split(os.path.abspath(path))
    ours = re.compile(rf"^{re.escape(name)}\.tmp-(\d+)$")
    removed = []
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        match = ours.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _running(int(match.group(1))):
            os.remove(entry.path)
            removed.append(entry.path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier run with the same PID: this run has not created it yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a PID we can ask about: leave its files alone
    return True


@contextlib.contextmanager
def building_dataset(prefix: str, dtype):
    """An IndexedDatasetBuilder whose dataset appears at ``prefix`` only if the ``with`` block succeeds.

    Both files are written under temporary names; on success any old .idx is removed, the .bin is
    renamed into place and the .idx (which makes the dataset visible) last. On failure nothing at
    ``prefix`` changes and the temporary files are removed.
    """
    bin_path, idx_path = data_file_path(prefix), index_file_path(prefix)
    temp_bin, temp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    for path in (bin_path, idx_path):
        remove_stale_temporaries(path)
    try:
        builder = IndexedDatasetBuilder(temp_bin, dtype=dtype)
        yield builder
        builder.finalize(temp_idx)
        if os.path.exists(idx_path):
            os.remove(idx_path)  # an old index must not be paired with the new .bin, even briefly
        os.replace(temp_bin, bin_path)
        os.replace(temp_idx, idx_path)
    finally:
        for path in (temp_bin, temp_idx):
            if os.path.exists(path):
                os.remove(path)

"""What a checkpoint says about itself, defined once: the dataclasses behind metadata.json and manifest.json.

* ``metadata.json`` = CheckpointMetadata: the format stamp, the iteration, and the TrainingMetadata
  (progress, schedule, config, tokenizer, and the parallel Layout it was saved under);
* ``manifest.json`` = Manifest: every file's size and CRC-32 (FileEntry) and every global tensor's
  shape, dtype and pieces (TensorEntry of StoredPieces), built by Manifest.from_reports from the
  FileReport each writer sends (its file, size, CRC-32 and the Pieces in it) or its WriteFailure.

Each has ``to_json()`` (what is written, unchanged since the format's first version) and
``from_json(data, where)``, which checks every field (json_checks.py: types, required fields,
non-negative offsets and shapes, pieces inside their tensor, plain file names) and raises
CheckpointError naming ``where`` (the file, or the rank whose report it is) and the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

from longctx_megatron.checkpoint import json_checks as check
from longctx_megatron.checkpoint import keys
from longctx_megatron.checkpoint.errors import CheckpointError

FORMAT = "longctx-megatron sharded checkpoint"
VERSION = 1


# ----------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class Piece:
    """One box of a global tensor, as the rank that writes it reports it: stored under ``key`` in the
    rank's file, it holds ``shape`` values at ``offsets`` of tensor ``name`` (``global_shape``, ``dtype``)."""

    name: str
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "key": self.key, "offsets": list(self.offsets), "shape": list(self.shape),
                "global_shape": list(self.global_shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data, where: str) -> Piece:
        data = check.json_object(data, where)
        piece = cls(check.string(data, "name", where), check.string(data, "key", where),
                    check.non_negative_ints(data, "offsets", where), check.non_negative_ints(data, "shape", where),
                    check.non_negative_ints(data, "global_shape", where), check.dtype_name(data, "dtype", where))
        check.inside(piece.offsets, piece.shape, piece.global_shape, f"{where} ({piece.key!r})")
        return piece


@dataclass(frozen=True)
class FileReport:
    """What a writer sends the publisher about the file it wrote: name, size, CRC-32 and the pieces in it."""

    file: str
    bytes: int
    crc32: int
    index: tuple[Piece, ...]

    def to_json(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "crc32": self.crc32,
                "index": [piece.to_json() for piece in self.index]}

    @classmethod
    def from_json(cls, data, where: str) -> FileReport:
        data = check.json_object(data, where)
        index = check.json_list(data, "index", where)
        return cls(check.file_name(data, "file", where), check.non_negative(data, "bytes", where),
                   check.non_negative(data, "crc32", where),
                   tuple(Piece.from_json(piece, f"{where}: index[{number}]") for number, piece in enumerate(index)))


@dataclass(frozen=True)
class WriteFailure:
    """What a writer sends instead of a FileReport when it could not write its file; the save fails."""

    error: str

    def to_json(self) -> dict:
        return {"error": self.error}

    @classmethod
    def from_json(cls, data, where: str) -> WriteFailure:
        return cls(check.string(check.json_object(data, where), "error", where))


def report_from_json(data, where: str) -> FileReport | WriteFailure:
    """A writer's report, whichever of the two it is."""
    failed = "error" in check.json_object(data, where)
    return WriteFailure.from_json(data, where) if failed else FileReport.from_json(data, where)


@dataclass(frozen=True)
class FileEntry:
    """A file of the checkpoint as the manifest records it, to verify it before loading."""

    bytes: int
    crc32: int

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "crc32": self.crc32}

    @classmethod
    def from_json(cls, data, where: str) -> FileEntry:
        data = check.json_object(data, where)
        check.only_fields(data, {"bytes", "crc32"}, where)
        crc32 = check.non_negative(data, "crc32", where)
        if crc32 > 0xFFFFFFFF:
            raise check.wrong(where, "crc32", crc32, "a 32-bit CRC")
        return cls(check.non_negative(data, "bytes", where), crc32)


@dataclass(frozen=True)
class StoredPiece:
    """A piece of a global tensor as the manifest records it: ``shape`` values at ``offsets``, stored
    under ``key`` in ``file``."""

    file: str
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"file": self.file, "key": self.key, "offsets": list(self.offsets), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data, where: str) -> StoredPiece:
        data = check.json_object(data, where)
        check.only_fields(data, {"file", "key", "offsets", "shape"}, where)
        return cls(check.file_name(data, "file", where), check.string(data, "key", where),
                   check.non_negative_ints(data, "offsets", where), check.non_negative_ints(data, "shape", where))


@dataclass(frozen=True)
class TensorEntry:
    """A global tensor: its shape and dtype, and the pieces (in any files) that together cover it."""

    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[StoredPiece, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "pieces": [piece.to_json() for piece in self.pieces]}

    @classmethod
    def from_json(cls, data, where: str) -> TensorEntry:
        data = check.json_object(data, where)
        check.only_fields(data, {"shape", "dtype", "pieces"}, where)
        shape, dtype = check.non_negative_ints(data, "shape", where), check.dtype_name(data, "dtype", where)
        pieces = []
        for number, piece in enumerate(check.json_list(data, "pieces", where)):
            pieces.append(StoredPiece.from_json(piece, f"{where}: pieces[{number}]"))
            check.inside(pieces[-1].offsets, pieces[-1].shape, shape, f"{where}: pieces[{number}]")
        _check_tiling(pieces, shape, where)
        return cls(shape, dtype, tuple(pieces))


def _check_tiling(pieces: list[StoredPiece], shape: tuple[int, ...], where: str) -> None:
    """The pieces (each inside the tensor) cover every element exactly once: no two overlap and their
    sizes add up to the tensor's. Overlaps or gaps would leave uninitialised memory in the weights."""
    total = sum(math.prod(piece.shape) for piece in pieces)
    if total != math.prod(shape):
        raise CheckpointError(f"{where}: its pieces hold {total} values, the tensor of shape {list(shape)} has "
                              f"{math.prod(shape)} (a gap or an overlap)")
    boxes = sorted((piece.offsets, piece.shape, number) for number, piece in enumerate(pieces)
                   if math.prod(piece.shape))
    for i, (offsets, size, number) in enumerate(boxes):
        for other_offsets, other_size, other in boxes[i + 1:]:
            if shape and other_offsets[0] >= offsets[0] + size[0]:
                break  # sorted by the first offset: no later box can overlap this one
            spans = zip(offsets, size, other_offsets, other_size, strict=True)
            if all(start < other_start + other_length and other_start < start + length
                   for start, length, other_start, other_length in spans):
                raise CheckpointError(f"{where}: pieces[{number}] and pieces[{other}] overlap")


@dataclass(frozen=True)
class Manifest:
    """manifest.json: every file of the checkpoint and every global tensor, by name."""

    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]

    @classmethod
    def from_reports(cls, reports: list[FileReport], more_files: dict[str, FileEntry]) -> Manifest:
        """The manifest of the files of ``reports`` (their pieces grouped by tensor, in report order) and
        ``more_files`` (metadata.json). Pieces of one tensor must agree on its shape and dtype."""
        files, heads, pieces = {}, {}, {}
        for report in reports:
            if report.file in files:
                raise CheckpointError(f"two writers reported the file {report.file}")
            files[report.file] = FileEntry(report.bytes, report.crc32)
            for piece in report.index:
                head = heads.setdefault(piece.name, (piece.global_shape, piece.dtype))
                if head != (piece.global_shape, piece.dtype):
                    raise CheckpointError(f"{report.file}: {piece.key!r} is a piece of {piece.name} of shape "
                                          f"{list(piece.global_shape)} {piece.dtype}, but other pieces say "
                                          f"{list(head[0])} {head[1]}")
                stored = StoredPiece(report.file, piece.key, piece.offsets, piece.shape)
                pieces.setdefault(piece.name, []).append(stored)
        tensors = {name: TensorEntry(*heads[name], tuple(found)) for name, found in pieces.items()}
        return cls({**files, **more_files}, tensors)

    def to_json(self) -> dict:
        return {"files": {name: entry.to_json() for name, entry in self.files.items()},
                "tensors": {name: entry.to_json() for name, entry in self.tensors.items()}}

    @classmethod
    def from_json(cls, data, where: str) -> Manifest:
        data = check.json_object(data, where)
        check.only_fields(data, {"files", "tensors"}, where)
        files = check.json_object(check.required(data, "files", where), f"{where}: files")
        tensors = check.json_object(check.required(data, "tensors", where), f"{where}: tensors")
        manifest = cls({check.plain_name(name, "a file's name", f"{where}: files"):
                        FileEntry.from_json(entry, f"{where}: files[{name!r}]") for name, entry in files.items()},
                       {name: TensorEntry.from_json(entry, f"{where}: tensor {name!r}")
                        for name, entry in tensors.items()})
        stored = sum(entry.bytes for entry in manifest.files.values())
        for name, entry in manifest.tensors.items():  # only files whose size and CRC-32 are verified
            if not keys.is_tensor_name(name):
                raise CheckpointError(f"{where}: tensor name {name!r:.80} is not model/<param>, "
                                      "optimizer/<kind>/<param> or rng/rankNNNNN/<state>")
            claimed = math.prod(entry.shape) * entry.torch_dtype.itemsize
            if claimed > stored:  # refused before anything of that size is allocated
                raise CheckpointError(f"{where}: tensor {name!r} of shape {list(entry.shape)} needs {claimed:,} "
                                      f"bytes, more than all the checkpoint's files hold ({stored:,})")
            if not keys.is_rng_key(name) and not entry.torch_dtype.is_floating_point:
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {entry.dtype}; weights and optimizer "
                                      "state are floating point")
            for piece in entry.pieces:
                if piece.file not in manifest.files:
                    raise CheckpointError(f"{where}: tensor {name!r} has a piece in {piece.file}, which is not "
                                          "among the manifest's files (their sizes and CRC-32 are what is verified)")
        return manifest


# ----------------------------------------------------------------------------------- the metadata
@dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint was saved under: RNG states are restored only under an identical one."""

    tensor: int
    pipeline: int
    data: int
    stage_layers: tuple[int, ...]  # layers of every (virtual) pipeline stage
    sequence_parallel: bool
    distributed_optimizer: bool
    context: int = 1  # context-parallel size; written only when > 1, so layouts without CP read as before

    def to_json(self) -> dict:
        out = {**asdict(self), "stage_layers": list(self.stage_layers)}
        if self.context == 1:
            del out["context"]
        return out

    @classmethod
    def from_json(cls, data, where: str) -> Layout:
        data = check.json_object(data, where)
        context = check.positive(data, "context", where) if "context" in data else 1
        return cls(check.positive(data, "tensor", where), check.positive(data, "pipeline", where),
                   check.positive(data, "data", where), check.non_negative_ints(data, "stage_layers", where),
                   check.boolean(data, "sequence_parallel", where), check.boolean(data, "distributed_optimizer", where),
                   context)


_LOSS_SCALER = {"scale": check.number, "clean_steps": check.non_negative}
_LEARNING_RATE = {"lr": check.number, "min_lr": check.number, "warmup_iters": check.non_negative,
                  "decay_iters": check.non_negative, "decay_style": check.string}
_TOKENIZER = {"name": check.string, "checksum": check.string}
_OPTIONAL = {"global_batch_size": check.non_negative, "seq_length": check.non_negative, "seed": check.integer,
             "saved_at": check.string, "converted_from": check.string}


@dataclass(frozen=True)
class TrainingMetadata:
    """The state a checkpoint resumes training from (metadata.json besides its header). The last five
    fields are written only when set: training sets the first four, the converters ``converted_from``."""

    consumed_samples: int
    skipped_iterations: int
    optimizer_steps: int
    loss_scaler: dict | None  # fp16's dynamic loss scaler: {"scale", "clean_steps"}
    learning_rate: dict | None  # the schedule trained with: {"lr", "min_lr", "warmup_iters", ...}
    config: dict  # config_to_dict of the ModelConfig
    tokenizer: dict | None  # {"name", "checksum"}
    layout: Layout
    params_dtype: str
    global_batch_size: int | None = None
    seq_length: int | None = None
    seed: int | None = None
    saved_at: str | None = None
    converted_from: str | None = None

    def to_json(self) -> dict:
        out = {field.name: getattr(self, field.name) for field in fields(self)
               if field.name not in _OPTIONAL or getattr(self, field.name) is not None}
        return {**out, "layout": self.layout.to_json()}

    @classmethod
    def from_json(cls, data, where: str) -> TrainingMetadata:
        data = check.json_object(data, where)
        check.only_fields(data, {field.name for field in fields(cls)}, where)
        return cls(
            consumed_samples=check.non_negative(data, "consumed_samples", where),
            skipped_iterations=check.non_negative(data, "skipped_iterations", where),
            optimizer_steps=check.non_negative(data, "optimizer_steps", where),
            loss_scaler=check.optional_record(data, "loss_scaler", where, _LOSS_SCALER),
            learning_rate=check.optional_record(data, "learning_rate", where, _LEARNING_RATE),
            config=check.json_object(check.required(data, "config", where), f"{where}: config"),
            tokenizer=check.optional_record(data, "tokenizer", where, _TOKENIZER),
            layout=Layout.from_json(check.required(data, "layout", where), f"{where}: layout"),
            params_dtype=check.params_dtype(data, "params_dtype", where),
            **{key: read(data, key, where) for key, read in _OPTIONAL.items() if data.get(key) is not None})


_HEADER = ("format", "version", "iteration")


@dataclass(frozen=True)
class CheckpointMetadata:
    """metadata.json: the format stamp and version, the iteration it was saved after, the training metadata."""

    iteration: int
    training: TrainingMetadata

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "iteration": self.iteration, **self.training.to_json()}

    @classmethod
    def from_json(cls, data, where: str) -> CheckpointMetadata:
        data = check.json_object(data, where)
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{where} is not a {FORMAT}")
        if data.get("version") != VERSION:
            raise CheckpointError(f"{where}: version {data.get('version')!r}; this code reads version {VERSION}")
        training = {key: value for key, value in data.items() if key not in _HEADER}
        return cls(check.non_negative(data, "iteration", where), TrainingMetadata.from_json(training, where))

"""Reading a sharded checkpoint: its manifest, any box of any global tensor, and verification.

A request for a region of a global tensor is served from every saved piece that overlaps it,
reading only the overlapping bytes (the shard files are memory-mapped), so a rank loading under a
new layout reads about as much as it holds.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.layout import MANIFEST, MANIFEST_CRC, METADATA
from longctx_megatron.checkpoint.manifest import CheckpointMetadata, Manifest, TensorEntry
from longctx_megatron.checkpoint.paths import regular_file, regular_file_problem
from longctx_megatron.checkpoint.safetensors_io import SafetensorsError, SafetensorsReader, file_crc32


def read_json(path: str) -> dict:
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)")
    try:
        with open(regular_file(path)) as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None


def verify_files(directory: str, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems with the files of ``directory`` (empty when it is sound). Rank r checks every
    world_size-th file's size and CRC-32 (and a safetensors file's header), so a checkpoint is verified
    in parallel. Both JSON files are checked field by field first."""
    manifest_path, metadata_path = os.path.join(directory, MANIFEST), os.path.join(directory, METADATA)
    if problem := manifest_crc_problem(directory):
        return [problem]
    try:
        manifest = Manifest.from_json(read_json(manifest_path), manifest_path)
        CheckpointMetadata.from_json(read_json(metadata_path), metadata_path)
    except CheckpointError as error:
        return [str(error)]
    problems = []
    for position, (name, expected) in enumerate(sorted(manifest.files.items())):
        if position % world_size != rank:
            continue
        path = os.path.join(directory, name)
        if problem := regular_file_problem(path):
            problems.append(problem)
        elif (size := os.path.getsize(path)) != expected.bytes:
            problems.append(f"{path} has {size} bytes, the manifest says {expected.bytes} (truncated?)")
        elif file_crc32(path) != expected.crc32:
            problems.append(f"{path} does not match its CRC-32 in the manifest (corrupt)")
        elif name.endswith(".safetensors"):  # a header made wrong before its CRC was taken: damage too
            try:
                SafetensorsReader(path).close()
            except SafetensorsError as error:
                problems.append(str(error))
    return problems


def manifest_crc_problem(directory: str) -> str | None:
    """Damage to manifest.json itself, caught by its CRC-32 in manifest.crc32 (checkpoints written before
    the sidecar existed have none, and are checked by their manifest's structure alone)."""
    sidecar, manifest = os.path.join(directory, MANIFEST_CRC), os.path.join(directory, MANIFEST)
    if not os.path.lexists(sidecar):
        return None
    if (problem := regular_file_problem(sidecar)) or (problem := regular_file_problem(manifest)):
        return problem
    if os.path.getsize(sidecar) > 64:
        return f"{sidecar} is not a CRC-32 ({os.path.getsize(sidecar)} bytes)"
    with open(sidecar, "rb") as file:
        text = file.read().strip()
    if not re.fullmatch(rb"[0-9a-f]{8}", text):  # exactly what publish_checkpoint writes
        return f"{sidecar} is not a CRC-32 ({text[:20]!r})"
    if file_crc32(manifest) != int(text, 16):
        return f"{manifest} does not match its CRC-32 in {MANIFEST_CRC} (corrupt)"
    return None


class CheckpointReader:
    """The tensors of one checkpoint directory, by global name.

    ``metadata`` and ``tensors`` are metadata.json and the manifest's tensors as JSON; the manifest is
    checked field by field on opening, and each entry is read through TensorEntry.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.metadata = read_json(os.path.join(directory, METADATA))
        path = os.path.join(directory, MANIFEST)
        manifest = read_json(path)
        Manifest.from_json(manifest, path)  # a malformed manifest is refused on opening, by field
        self.tensors: dict[str, dict] = manifest["tensors"]
        self._files: dict[str, SafetensorsReader] = {}

    def checkpoint_metadata(self) -> CheckpointMetadata:
        """metadata.json, checked field by field."""
        return CheckpointMetadata.from_json(self.metadata, os.path.join(self.directory, METADATA))

    def names(self) -> list[str]:
        return list(self.tensors)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).torch_dtype

    def _entry(self, name: str) -> TensorEntry:
        if name not in self.tensors:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}")
        return TensorEntry.from_json(self.tensors[name], f"{os.path.join(self.directory, MANIFEST)}: tensor {name!r}")

    def _file(self, name: str) -> SafetensorsReader:
        if name not in self._files:
            try:
                self._files[name] = SafetensorsReader(regular_file(os.path.join(self.directory, name)))
            except (OSError, SafetensorsError) as error:
                raise CheckpointError(str(error)) from None
        return self._files[name]

    def read_box(self, name: str, offsets: list[int], sizes: list[int]) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of global tensor ``name``, as saved (dtype included)."""
        entry = self._entry(name)
        out = torch.empty(sizes, dtype=entry.torch_dtype)
        covered = 0
        for piece in entry.pieces:
            lo = [max(o, p) for o, p in zip(offsets, piece.offsets, strict=True)]
            hi = [min(o + s, p + n) for o, s, p, n in zip(offsets, sizes, piece.offsets, piece.shape, strict=True)]
            if any(a >= b for a, b in zip(lo, hi, strict=True)):
                continue
            try:
                source = self._file(piece.file).get(piece.key)
            except SafetensorsError as error:  # the manifest names a key the file does not hold
                raise CheckpointError(f"{error} (named by {MANIFEST} for {name!r})") from None
            if tuple(source.shape) != piece.shape or source.dtype != entry.torch_dtype:
                raise CheckpointError(f"{self.directory}/{piece.file}: {piece.key!r} is {list(source.shape)} "
                                      f"{source.dtype}; the manifest says {list(piece.shape)} {entry.torch_dtype}")
            source = source[tuple(slice(a - p, b - p) for a, b, p in zip(lo, hi, piece.offsets, strict=True))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))].copy_(source)
            covered += math.prod(b - a for a, b in zip(lo, hi, strict=True))
        if covered != math.prod(sizes):
            raise CheckpointError(f"{self.directory}: the pieces of {name!r} cover {covered} of the "
                                  f"{math.prod(sizes)} values requested")
        return out

    def read_global(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.read_box(name, [0] * len(shape), list(shape))

    def read_local(self, name: str, spec, local_shape) -> torch.Tensor:
        """A rank's slice of ``name``: the whole tensor when ``spec`` is None, else the ShardSpec's slice
        (padding zero). The global shape must be the one the model expects."""
        expected = tuple(spec.global_shape) if spec is not None else tuple(local_shape)
        if self.shape(name) != expected:
            raise CheckpointError(f"{name} has shape {list(self.shape(name))} in {self.directory} but "
                                  f"{list(expected)} in this model")
        if spec is None:
            return self.read_box(name, [0] * len(expected), list(expected))
        out = torch.zeros(tuple(local_shape), dtype=self.dtype(name))
        for local, start, length in spec.regions():
            if length:
                offsets = [0] * len(expected)
                offsets[spec.dim] = start
                sizes = list(local_shape)
                sizes[spec.dim] = length
                out.narrow(spec.dim, local, length).copy_(self.read_box(name, offsets, sizes))
        return out

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

"""Resharding against the oracle: pieces saved from every rank of one layout, read back as any other
layout's slices, equal ShardSpec.take of the global tensor (padding included)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from longctx_megatron.checkpoint import layout, state
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.checkpoint.safetensors_io import write_safetensors
from longctx_megatron.parallel.layers import ShardSpec

CASES = {  # name: (global shape, dim, padded(tp) or None, parts)
    "column (qkv)": ((24, 8), 0, None, 1),
    "row (out, down)": ((8, 24), 1, None, 1),
    "stacked gate_up": ((32, 8), 0, None, 2),
    "vocabulary, padded": ((37, 8), 0, lambda tp: 48 * tp, 1),
}


def _spec(case, rank, size):
    shape, dim, padded, parts = CASES[case]
    return ShardSpec(dim, rank, size, shape, padded(size) if padded else shape[dim], parts)


def _save(directory, name, full, case, size):
    """Write every rank's pieces of ``full`` as a checkpoint would (one file per rank)."""
    os.makedirs(directory)
    tensors, files = {}, {}
    for rank in range(size):
        spec = _spec(case, rank, size) if size > 1 else None
        local = spec.take(full) if spec else full
        pieces, entries = {}, []
        for part, (offsets, box) in enumerate(state.boxes(local, spec)):
            pieces[f"{name}#{part}"] = box.contiguous()
            entries.append({"file": layout.shard_file(rank), "key": f"{name}#{part}", "offsets": offsets,
                            "shape": list(box.shape)})
        written = write_safetensors(os.path.join(directory, layout.shard_file(rank)), pieces)
        files[layout.shard_file(rank)] = {"bytes": written.bytes, "crc32": written.crc32}
        tensors.setdefault(name, {"shape": list(full.shape), "dtype": str(full.dtype), "pieces": []})
        tensors[name]["pieces"] += entries
    with open(os.path.join(directory, layout.MANIFEST), "w") as file:
        json.dump({"files": files, "tensors": tensors}, file)
    with open(os.path.join(directory, layout.METADATA), "w") as file:
        json.dump({}, file)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("saved_tp,loaded_tp", [(2, 1), (2, 4), (4, 2), (1, 4), (4, 4)])
def test_any_layout_reads_back_its_slices(tmp_path, case, saved_tp, loaded_tp):
    full = torch.randn(CASES[case][0])
    _save(str(tmp_path / "ckpt"), "model/w", full, case, saved_tp)
    reader = CheckpointReader(str(tmp_path / "ckpt"))
    assert torch.equal(reader.read_global("model/w"), full)
    for rank in range(loaded_tp):
        spec = _spec(case, rank, loaded_tp) if loaded_tp > 1 else None
        expected = spec.take(full) if spec else full
        assert torch.equal(reader.read_local("model/w", spec, expected.shape), expected), rank


def test_shape_mismatch_and_missing_pieces_are_named(tmp_path):
    full = torch.randn(24, 8)
    _save(str(tmp_path / "ckpt"), "model/w", full, "column (qkv)", 2)
    reader = CheckpointReader(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"model/w has shape \[24, 8\] in .* but \[24, 6\] in this model"):
        reader.read_local("model/w", None, (24, 6))
    reader.tensors["model/w"]["pieces"].pop()
    with pytest.raises(CheckpointError, match=r"its pieces hold 96 values, the tensor of shape \[24, 8\] has 192"):
        reader.read_global("model/w")


@pytest.mark.parametrize("shape", [(5, 7), (9,), (1, 4)])
def test_flat_ranges_become_boxes_that_cover_exactly_the_range(shape):
    """The distributed optimizer writes flat ranges of parameters as boxes; every range must round-trip."""
    full = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    flat = full.flatten()
    for start in range(flat.numel()):
        for stop in range(start + 1, flat.numel() + 1):
            rebuilt = torch.full_like(full, -1.0)
            for offsets, box in state.flat_boxes(flat[start:stop], full.shape, start):
                rebuilt[tuple(slice(o, o + n) for o, n in zip(offsets, box.shape, strict=True))] = box
            expected = torch.full_like(flat, -1.0)
            expected[start:stop] = flat[start:stop]
            assert torch.equal(rebuilt.flatten(), expected), (start, stop)


def test_local_boxes_map_to_global_through_padding_and_stacked_parts():
    spec = _spec("stacked gate_up", 1, 2)  # rank 1 of 2: rows 8-15 and 24-31 of the global [32, 8]
    full = torch.randn(32, 8)
    local = spec.take(full)
    pieces = state.local_to_global(spec, [6, 2], local[6:11, 2:5])  # crosses the part boundary at row 8
    assert [offsets for offsets, _ in pieces] == [[14, 2], [24, 2]]
    for offsets, box in pieces:
        assert torch.equal(box, full[offsets[0]:offsets[0] + box.shape[0], offsets[1]:offsets[1] + box.shape[1]])
    spec = _spec("vocabulary, padded", 1, 2)  # rows 48-95 of a padded 96; the tensor has 37: all padding
    assert state.local_to_global(spec, [0, 0], torch.zeros(48, 8)) == []

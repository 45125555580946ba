"""Random mutations of a valid safetensors file and of a whole checkpoint (seeded, so every run tries
the same cases): the loaders answer with their own error types only, never another exception, and
never load changed bytes as if they were sound.

``FUZZ_SCALE=20 pytest tests/checkpoint/test_fuzz.py`` tries 20 times as many cases (other seeds'
worth of the same generators); CI runs scale 1 (about 6 s)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from longctx_megatron.checkpoint import layout
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.reader import CheckpointReader, verify_files
from longctx_megatron.checkpoint.safetensors_io import (
    SafetensorsError,
    SafetensorsReader,
    file_crc32,
    write_safetensors,
)
from tests.checkpoint.test_convert import convert, hf_model

TENSORS = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64),
           "c": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 4)}
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
_JUNK = [None, True, -1, 2**70, 1.5, "F32", "x", [], [-1], [1, 0], [0, 10**12], {}, {"dtype": "F32"}, [[0]]]


def _mutate_bytes(data: bytes, rng: random.Random, low: int = 0) -> bytes:
    """One random edit at or after byte ``low``: flip bits, overwrite, insert, delete or truncate."""
    data = bytearray(data)
    at = rng.randrange(low, len(data))
    how = rng.choice(["flip", "overwrite", "insert", "delete", "truncate"])
    if how == "flip":
        data[at] ^= 1 << rng.randrange(8)
    elif how == "overwrite":
        data[at:at + 4] = bytes(rng.randrange(256) for _ in range(4))
    elif how == "insert":
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif how == "delete":
        del data[at:at + rng.randint(1, 8)]
    else:
        del data[at:]
    return bytes(data)


def _mutate_header(header: dict, rng: random.Random) -> dict:
    """Replace one value anywhere in the header's JSON by junk of another type or size."""
    header = json.loads(json.dumps(header))
    name = rng.choice(sorted(header))
    if name == "__metadata__" or rng.random() < 0.2:
        header[name] = rng.choice(_JUNK)
    else:
        field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if field == "extra":
            header[name]["unknown"] = 1
        elif rng.random() < 0.5:
            header[name][field] = rng.choice(_JUNK)
        else:  # a plausible neighbour: another dtype, a dimension or an offset one off
            value = header[name][field]
            if field == "dtype":
                header[name][field] = rng.choice(["F16", "I32", "U8", "F64", "BOOL", "I8", "BF16"])
            elif value:
                value[rng.randrange(len(value))] += rng.choice([-1, 1, 4])
    return header


def _encode(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + data


def _read_all(path: str) -> dict[str, torch.Tensor]:
    with SafetensorsReader(path) as reader:
        return {name: reader.get(name).clone() for name in reader.keys()}


def test_random_mutations_of_a_safetensors_file_give_only_safetensors_errors(tmp_path):
    path = str(tmp_path / "valid.safetensors")
    write_safetensors(path, TENSORS, {"format": "pt"})
    valid = open(path, "rb").read()
    length = int.from_bytes(valid[:8], "little")
    header, data = json.loads(valid[8:8 + length]), valid[8 + length:]
    rng, outcomes = random.Random(13), {"refused": 0, "loaded": 0}
    for case in range(600 * SCALE):
        mutated = _encode(_mutate_header(header, rng), data) if case % 2 else _mutate_bytes(valid, rng)
        with open(path, "wb") as file:
            file.write(mutated)
        try:
            loaded = _read_all(path)
        except SafetensorsError:
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        # What loads is exactly what the (mutated) header describes, read from inside the data section.
        start = 8 + int.from_bytes(mutated[:8], "little")
        entries = {k: v for k, v in json.loads(mutated[8:start]).items() if k != "__metadata__"}
        assert sorted(loaded) == sorted(entries)
        for name, tensor in loaded.items():
            begin, end = entries[name]["data_offsets"]
            assert list(tensor.shape) == entries[name]["shape"]
            assert tensor.contiguous().view(torch.uint8).flatten().numpy().tobytes() == mutated[start + begin:
                                                                                                 start + end]
    assert outcomes["refused"] > 400 * SCALE and outcomes["loaded"] > 0  # both paths were exercised


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A native checkpoint (a tiny Hugging Face Llama converted at TP 2), and its global tensors."""
    root = tmp_path_factory.mktemp("fuzz")
    hf_dir = hf_model(str(root / "hf"), "llama", num_hidden_layers=1)
    assert convert.main(["--from", "hf", "--to", "native", "--input", hf_dir, "--output", str(root / "ckpt"),
                         "--target-tensor-parallel-size", "2"], log=lambda *_: None) == 0
    return layout.iteration_dir(str(root / "ckpt"), 0)


def _load(directory: str, expected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """Every global tensor as a loading model gets it (the names and shapes of ``expected`` when
    given, as the model asks for its own), or None when the checkpoint is refused."""
    if verify_files(directory):
        return None
    try:
        reader = CheckpointReader(directory)
        if expected is None:
            return {name: reader.read_global(name) for name in reader.names()}
        return {name: reader.read_local(name, None, tensor.shape) for name, tensor in expected.items()}
    except CheckpointError:
        return None


def test_random_mutations_of_a_checkpoint_are_refused_or_change_nothing(checkpoint, tmp_path):
    original = _load(checkpoint)
    assert original
    names = sorted(os.listdir(checkpoint))
    rng, refused = random.Random(7), 0
    for _ in range(300 * SCALE):
        target = str(tmp_path / "mutated")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint, target)
        victim = os.path.join(target, rng.choice(names))
        with open(victim, "rb") as file:
            data = file.read()
        with open(victim, "wb") as file:
            file.write(_mutate_bytes(data, rng))
        loaded = _load(target, original)
        if loaded is None:
            refused += 1
            continue
        assert sorted(loaded) == sorted(original)  # only a change that alters nothing may load
        for name, tensor in loaded.items():
            assert torch.equal(tensor, original[name]) and tensor.dtype == original[name].dtype, name
    assert refused > 250 * SCALE


def _mutate_json(value, rng: random.Random):
    """``value`` with one node somewhere inside replaced by junk, or one key removed or added."""
    if isinstance(value, (dict, list)) and value and rng.random() < 0.8:
        keys = sorted(value) if isinstance(value, dict) else range(len(value))
        key = rng.choice(list(keys))
        if isinstance(value, dict) and rng.random() < 0.1:
            return {k: v for k, v in value.items() if k != key}
        if isinstance(value, dict) and rng.random() < 0.1:
            return {**value, "unexpected": 1}
        copy = dict(value) if isinstance(value, dict) else list(value)
        copy[key] = _mutate_json(value[key], rng)
        return copy
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value + rng.choice([-1, 1, 2**40])
    return rng.choice(_JUNK + ["../x.safetensors", "/etc/hostname", "torch.int32", "model/embedding"])


def _reseal(directory: str) -> None:
    """Make the CRCs agree again after an edit of metadata.json or manifest.json, as a crafted (not
    damaged) checkpoint would: only the structure and field checks stand between it and the model."""
    manifest_path = os.path.join(directory, layout.MANIFEST)
    manifest = json.load(open(manifest_path))
    metadata_path = os.path.join(directory, layout.METADATA)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entry = files.get(layout.METADATA) if isinstance(files, dict) else None
    if isinstance(entry, dict):
        entry.update(bytes=os.path.getsize(metadata_path), crc32=file_crc32(metadata_path))
        json.dump(manifest, open(manifest_path, "w"))
    open(os.path.join(directory, layout.MANIFEST_CRC), "w").write(f"{file_crc32(manifest_path):08x}\n")


@pytest.mark.parametrize("victim", [layout.MANIFEST, layout.METADATA])
def test_crafted_json_that_passes_its_crc_is_refused_by_its_field_checks_or_changes_nothing(checkpoint, tmp_path,
                                                                                             victim):
    original = _load(checkpoint)
    rng, refused = random.Random(victim), 0
    for _ in range(250 * SCALE):
        target = str(tmp_path / "crafted")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint, target)
        path = os.path.join(target, victim)
        json.dump(_mutate_json(json.load(open(path)), rng), open(path, "w"))
        _reseal(target)
        loaded = _load(target, original)
        if loaded is None:
            refused += 1
            continue
        assert sorted(loaded) == sorted(original)
        for name, tensor in loaded.items():
            assert torch.equal(tensor, original[name]) and tensor.dtype == original[name].dtype, name
    assert refused > 100 * SCALE

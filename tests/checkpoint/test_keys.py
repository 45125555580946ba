"""keys.py builds and parses every tensor name of a checkpoint; manifest.py checks every field of the
JSON that lists them. Names and fields from elsewhere are refused by name, never half-parsed."""

from __future__ import annotations

import copy
import re

import pytest

from longctx_megatron.checkpoint import keys
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.manifest import Manifest


def test_names_round_trip():
    param = "layers.3.attention.qkv.weight"
    assert keys.parameter_of(keys.model_key(param)) == param
    assert keys.parameter_of(keys.optimizer_key("exp_avg", param)) == param
    assert keys.parameter_of(keys.optimizer_key(keys.MAIN, param)) == param
    assert keys.rng_state_of(keys.rng_key(12, "chunk0/tensor"), 12) == "chunk0/tensor"
    assert keys.rng_state_of(keys.rng_key(12, "cpu"), 3) is None
    assert keys.is_model_key(keys.model_key(param)) and not keys.is_model_key(keys.optimizer_key("exp_avg", param))
    assert keys.is_rng_key(keys.rng_key(0, "cpu")) and not keys.is_rng_key(keys.model_key(param))
    for name in (keys.model_key(param), keys.optimizer_key("exp_avg_sq", param), keys.rng_key(7, "chunk1/tensor")):
        assert keys.is_tensor_name(name)


def test_piece_keys_tell_apart_boxes_and_parts():
    assert keys.piece_key("model/w") == "model/w"
    assert keys.piece_key("model/w", part=2) == "model/w#2"
    assert keys.piece_key("model/w", local_offsets=[0, 64]) == "model/w@0.64"
    assert keys.piece_key("model/w", part=0, local_offsets=[3]) == "model/w@3#0"


@pytest.mark.parametrize("kind", ["", "a/b"])
def test_an_optimizer_kind_must_be_a_plain_name(kind):
    with pytest.raises(ValueError, match="must be a non-empty name without '/'"):
        keys.optimizer_key(kind, "w")


@pytest.mark.parametrize("name", ["w", "model/", "model/a/b", "optimizer/exp_avg", "optimizer//w", "rng/cpu",
                                  "rng/rank1/cpu", "../model/w", 3])
def test_names_of_no_known_form_are_not_tensor_names(name):
    assert not keys.is_tensor_name(name)


_MANIFEST = {"files": {"shard_00000.safetensors": {"bytes": 100, "crc32": 1}},
             "tensors": {"model/w": {"shape": [2, 3], "dtype": "torch.float32", "pieces": [
                 {"file": "shard_00000.safetensors", "key": "model/w", "offsets": [0, 0], "shape": [2, 3]}]}}}


W = "tensors.model/w"
P = f"{W}.pieces.0"


@pytest.mark.parametrize("path,value,message", [
    ("files", KeyError, "the field 'files' is missing"),
    ("tensors", [], "tensors: expected a JSON object"),
    ("files.shard_00000@safetensors.bytes", -1, "bytes must be an integer >= 0, not -1"),
    ("files.shard_00000@safetensors.crc32", "1", "crc32 must be an integer >= 0, not '1'"),
    ("files.shard_00000@safetensors.extra", 1, "unknown field(s) 'extra'"),
    ("files.shard_00000@safetensors.crc32", 2**32, "crc32 must be a 32-bit CRC"),
    (f"{P}.extra", 1, "pieces[0]: unknown field(s) 'extra'"),
    (f"{W}.shape", [2, -3], "shape must be a list of integers >= 0, not [2, -3]"),
    (f"{W}.dtype", "torch.complex64", "dtype must be one of"),
    (f"{W}.dtype", "torch.int64", "weights and optimizer state are floating point"),
    (f"{W}.pieces", {}, "pieces must be a list, not {}"),
    (f"{P}.file", "../shard_00000.safetensors", "a plain file name"),
    (f"{P}.key", 5, "key must be a string, not 5"),
    (f"{P}.offsets", [0, 1], "offsets [0, 1] + shape [2, 3] extend beyond the tensor's [2, 3]"),
    (f"{P}.shape", [2, 2], "its pieces hold 4 values, the tensor of shape [2, 3] has 6"),
    (f"{P}.offsets", [0], "do not have the 2 dimensions of the tensor's [2, 3]"),
])
def test_each_manifest_field_is_checked_by_name(path, value, message):
    manifest = _edit(path, value)
    with pytest.raises(CheckpointError) as error:
        Manifest.from_json(manifest, "manifest.json")
    assert str(error.value).startswith("manifest.json") and re.search(re.escape(message), str(error.value)), error.value


def _edit(path: str, value):
    """A copy of the sound manifest with the field at dotted ``path`` set to ``value`` (KeyError: deleted);
    ``@`` stands for a dot inside a file name."""
    manifest = copy.deepcopy(_MANIFEST)
    parts = [part.replace("@", ".") for part in path.split(".")]
    node = manifest
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is KeyError:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return manifest


def test_a_tensor_name_of_no_known_form_is_refused():
    manifest = copy.deepcopy(_MANIFEST)
    manifest["tensors"]["optimizer/exp_avg"] = manifest["tensors"].pop("model/w")
    with pytest.raises(CheckpointError, match="tensor name 'optimizer/exp_avg' is not model/<param>"):
        Manifest.from_json(manifest, "manifest.json")


def test_the_sound_manifest_parses():
    manifest = Manifest.from_json(copy.deepcopy(_MANIFEST), "manifest.json")
    assert manifest.tensors["model/w"].shape == (2, 3)

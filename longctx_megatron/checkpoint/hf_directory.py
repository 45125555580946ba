"""Reading a Hugging Face model directory's weights (safetensors only, never pickle), as untrusted input.

The index's shard names must be plain names inside the directory; every shard is a regular file
whose safetensors header is checked before any data is read (checkpoint/safetensors_io.py).
"""

from __future__ import annotations

import os

import torch

from longctx_megatron.checkpoint.hf import ConversionError
from longctx_megatron.checkpoint.json_checks import plain_name
from longctx_megatron.checkpoint.paths import regular_file_problem
from longctx_megatron.checkpoint.reader import read_json
from longctx_megatron.checkpoint.safetensors_io import SafetensorsError, SafetensorsReader


def is_hf_directory(directory: str) -> bool:
    """Whether ``directory`` looks like a Hugging Face model (a config.json beside its weights)."""
    weights = ("model.safetensors", "model.safetensors.index.json")
    return os.path.isfile(os.path.join(directory, "config.json")) and any(
        os.path.lexists(os.path.join(directory, name)) for name in weights)


class HFCheckpoint:
    """Tensors of a Hugging Face model directory by name, memory-mapped; errors name the file or tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        self._readers: dict[str, SafetensorsReader] = {}
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.lexists(index):
            contents = read_json(index)
            weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: expected an object with a \"weight_map\" of tensor -> file name")
            for file in set(weight_map.values()):
                plain_name(file, "weight_map", index)  # a shard outside the directory is never opened
            self.files = weight_map
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            self.files = {name: "model.safetensors" for name in self._open("model.safetensors").keys()}
        else:
            raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                  "(pickled .bin checkpoints are not read)")

    def _open(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            path = os.path.join(self.directory, file)
            if not os.path.lexists(path):
                raise ConversionError(f"{path}: missing shard (listed in model.safetensors.index.json)")
            if problem := regular_file_problem(path):
                raise ConversionError(problem)
            try:
                self._readers[file] = SafetensorsReader(path)
            except SafetensorsError as error:
                raise ConversionError(str(error)) from None
        return self._readers[file]

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.files:
            raise ConversionError(f"{self.directory}: tensor {name} is missing")
        tensor = self._open(self.files[name]).get(name)
        if not tensor.dtype.is_floating_point:
            raise ConversionError(f"{self.directory}: tensor {name} has dtype {tensor.dtype}; weights must be "
                                  "floating point")
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"{name}: shape {list(tensor.shape)} in the checkpoint, {list(shape)} expected from "
                                  "config.json")
        return tensor.clone()

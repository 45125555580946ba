"""Reading a Megatron-LM checkpoint directory (``torch`` or ``torch_dist`` format) one global tensor at a time.

``open_megatron(root, step)`` returns a source with ``config`` and ``layout`` (from the checkpoint's
args) and ``get(names, global_shape)``: the first of ``names`` present, as a global tensor in
Megatron's global layout (see megatron.py), its shape checked against the args before use. Both
sources check every model key up front and refuse unknown weights by name; see megatron.py for
why every pickle goes through a restricted unpickler.
"""

from __future__ import annotations

import os
import re

import torch

from longctx_megatron.checkpoint import megatron
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.paths import regular_file

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


def _args_of(state: dict, where: str):
    version = state.get("checkpoint_version", 0)
    if not isinstance(version, (int, float)) or isinstance(version, bool) or version < 2.0:
        raise CheckpointError(f"{where}: checkpoint_version={version!r}; only megatron-core checkpoints "
                              "(version >= 2.0, the grouped QKV layout) are supported")
    if "args" not in state:
        raise CheckpointError(f"{where}: no 'args' (the model's arguments); cannot tell its shape")
    return state["args"]


class LegacyCheckpoint:
    """``iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt``: one pickle per tensor x pipeline rank."""

    format = "torch"

    def __init__(self, directory: str):
        files = {}
        for name in sorted(os.listdir(directory)):
            found = megatron._RANK_DIR.match(name)
            if not found:
                continue
            if found.group(3):
                raise CheckpointError(f"{directory}/{name}: expert-parallel shards (MoE) are not supported")
            path = os.path.join(megatron._plain_dir(os.path.join(directory, name)), megatron.LEGACY_FILE)
            files[(int(found.group(1)), None if found.group(2) is None else int(found.group(2)))] = path
        first = files.get((0, None)) or files.get((0, 0))
        if first is None:
            raise CheckpointError(f"{directory}: no mp_rank_00 or mp_rank_00_000 directory")
        self._states = {first: megatron.safe_load(first)}
        self.config, self.layout = megatron.config_from_megatron(_args_of(self._states[first], first), first)
        tp, pp, vp = self.layout.tensor, self.layout.pipeline, self.layout.virtual
        expected = {(t, None if pp == 1 else p) for t in range(tp) for p in range(pp)}
        if set(files) != expected:
            def show(ranks):
                return ", ".join(f"mp_rank_{t:02d}" + ("" if p is None else f"_{p:03d}") for t, p in sorted(
                    ranks, key=lambda r: (r[0], -1 if r[1] is None else r[1])))
            raise CheckpointError(f"{directory}: args say tensor {tp} x pipeline {pp}; missing "
                                  f"[{show(expected - set(files))}], unexpected [{show(set(files) - expected)}]")
        self.files = {(t, 0 if p is None else p): path for (t, p), path in files.items()}
        # global name -> (pipeline rank, model chunk key, name in that chunk); layers renumbered globally
        self.where: dict[str, tuple[int, str, str]] = {}
        next_layer = 0
        for chunk in range(vp):
            key = "model" if vp == 1 else f"model{chunk}"
            for stage in range(pp):
                names = self._names(stage, key)
                local = sorted({int(m.group(1)) for m in map(re.compile(r"^decoder\.layers\.(\d+)\.").match, names)
                                if m})
                if local != list(range(len(local))):
                    raise CheckpointError(f"{self.files[(0, stage)]}: {key} has layers {local}, expected 0..n-1")
                for name in names:
                    if name.endswith("._extra_state"):
                        continue
                    layer = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
                    glob = f"decoder.layers.{int(layer.group(1)) + next_layer}.{layer.group(2)}" if layer else name
                    self.where.setdefault(glob, (stage, key, name))
                next_layer += len(local)
        if next_layer != self.config.n_layers:
            raise CheckpointError(f"{directory}: the files hold {next_layer} layers, args.num_layers="
                                  f"{self.config.n_layers}")

    def _state(self, tensor: int, stage: int) -> dict:
        path = self.files[(tensor, stage)]
        if path not in self._states:
            self._states[path] = megatron.safe_load(path)
        return self._states[path]

    def _model(self, tensor: int, stage: int, key: str) -> dict:
        path, state = self.files[(tensor, stage)], self._state(tensor, stage)
        model = state.get(key)
        if not isinstance(model, dict) or not all(isinstance(name, str) for name in model):
            raise CheckpointError(f"{path}: '{key}' is missing or not a state dict (virtual pipeline "
                                  f"size {self.layout.virtual})")
        return model

    def _names(self, stage: int, key: str) -> list[str]:
        """The keys of chunk ``key`` of pipeline stage ``stage``, the same on every tensor rank, all known."""
        names = list(self._model(0, stage, key))
        if any(name.startswith("language_model.") for name in names):
            raise CheckpointError(f"{self.files[(0, stage)]}: '{key}' is a legacy Megatron-LM model (language_model.*, "
                                  "before megatron-core); only megatron-core GPTModel checkpoints are supported")
        for tensor in range(self.layout.tensor):
            model = self._model(tensor, stage, key)
            for name in model:
                if megatron.unknown_parameter(name):
                    raise CheckpointError(f"{self.files[(tensor, stage)]}: '{key}' holds {name}, a weight this "
                                          "converter does not know (converting without it would change the model)")
            if tensor and set(model) != set(names):
                different = sorted(set(model) ^ set(names))
                raise CheckpointError(f"{self.files[(tensor, stage)]}: '{key}' has other keys than "
                                      f"{self.files[(0, stage)]}: {different[:5]}")
        return names

    def get(self, names: list[str], global_shape: tuple[int, ...]) -> torch.Tensor:
        name = next((n for n in names if n in self.where), None)
        if name is None:
            raise CheckpointError(f"no {' or '.join(names)} in the checkpoint")
        stage, key, local = self.where[name]
        want = megatron.local_shape(name, global_shape, self.layout.tensor)
        shards = []
        for tensor in range(self.layout.tensor):
            value = self._model(tensor, stage, key).get(local)
            where = f"{self.files[(tensor, stage)]}: {key}.{local}"
            if not isinstance(value, torch.Tensor) or value.dtype not in megatron.FLOAT_DTYPES:
                raise CheckpointError(f"{where} is {type(value).__name__}"
                                      f"{'' if not isinstance(value, torch.Tensor) else ' ' + str(value.dtype)}, "
                                      "expected a floating-point tensor")
            if tuple(value.shape) != want:
                raise CheckpointError(f"{where} has shape {list(value.shape)}, the args say {list(want)} "
                                      f"(tensor rank {tensor} of {self.layout.tensor})")
            shards.append(value)
        return megatron.merge(name, shards).clone()


class DistCheckpoint:
    """``iter_N/`` written by torch.distributed.checkpoint: global tensors in chunks, read by our own reader."""

    format = "torch_dist"

    def __init__(self, directory: str):
        self.directory = directory
        info_path = os.path.join(directory, "metadata.json")
        info = megatron.read_json_object(info_path)
        if info.get("sharded_backend") != "torch_dist":
            raise CheckpointError(f"{info_path}: sharded_backend={info.get('sharded_backend')!r}; only torch_dist "
                                  "is supported")
        common = os.path.join(directory, "common.pt")
        self.config, self.layout = megatron.config_from_megatron(_args_of(megatron.safe_load(common), common), common)
        metadata_path = os.path.join(directory, ".metadata")
        metadata = megatron.dcp_read_metadata(metadata_path)
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        self.storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
        self.entries = {}
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(key, str) or not key.startswith(_MODEL_PREFIXES):
                continue  # optimizer state, rng state, rerun state: not weights
            if isinstance(entry, BytesStorageMetadata) or "._extra_state" in key:
                continue  # Transformer Engine's _extra_state objects (or tensors, in newer versions)
            if megatron.unknown_parameter(key):
                raise CheckpointError(f"{metadata_path}: holds {key}, a weight this converter does not know "
                                      "(converting without it would change the model)")
            if not isinstance(entry, TensorStorageMetadata) or entry.properties.dtype not in megatron.FLOAT_DTYPES:
                raise CheckpointError(f"{metadata_path}: {key} is not a floating-point tensor")
            size = tuple(entry.size)
            for chunk in entry.chunks:
                offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
                if len(offsets) != len(size) or len(sizes) != len(size) or any(
                        o < 0 or s <= 0 or o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
                    raise CheckpointError(f"{metadata_path}: {key} has a chunk {list(offsets)}+{list(sizes)} outside "
                                          f"its shape {list(size)}")
            self.entries[key] = entry

    def _read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (dim 0) of stored tensor ``key``, from every chunk that overlaps them."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        entry = self.entries[key]
        shape = (stop - start, *tuple(entry.size)[1:])
        out = torch.empty(shape, dtype=entry.properties.dtype)
        covered = torch.zeros(shape, dtype=torch.bool)
        for chunk in entry.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            low, high = max(start, offsets[0]), min(stop, offsets[0] + sizes[0])
            if low >= high:
                continue
            where = f"{self.directory}: {key} chunk at {list(offsets)}"
            info = self.storage.get(MetadataIndex(key, torch.Size(offsets)))
            if info is None:
                raise CheckpointError(f"{where} has no storage entry in .metadata")
            data = megatron.read_chunk(self.directory, info, where)
            if tuple(data.shape) != sizes or data.dtype != entry.properties.dtype:
                raise CheckpointError(f"{where}: stored {list(data.shape)} {data.dtype}, .metadata says "
                                      f"{list(sizes)} {entry.properties.dtype}")
            box = (slice(low - start, high - start), *(slice(o, o + s) for o, s in zip(offsets[1:], sizes[1:],
                                                                                        strict=True)))
            if covered[box].any():
                raise CheckpointError(f"{where} overlaps another chunk")
            out[box] = data[low - offsets[0]:high - offsets[0]]
            covered[box] = True
        if not covered.all():
            raise CheckpointError(f"{self.directory}: {key} rows {start}:{stop} are not all stored")
        return out

    def _stored(self, name: str, global_shape: tuple[int, ...]) -> torch.Tensor | None:
        layer = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
        candidates = [(name, None)]
        if layer:
            candidates.insert(0, (f"decoder.layers.{layer.group(2)}", int(layer.group(1))))
        for key, index in candidates:
            for parts in ([key], [key + "_w", key + "_v"]):  # swiglu fc1 saved as two keys (singleton shards)
                if not all(part in self.entries for part in parts):
                    continue
                pieces = []
                for part in parts:
                    size = tuple(self.entries[part].size)
                    want = ((self.config.n_layers,) if index is not None else ()) + (
                        global_shape if len(parts) == 1 else (global_shape[0] // 2, *global_shape[1:]))
                    if size != want:
                        raise CheckpointError(f"{self.directory}: {part} has shape {list(size)}, the args say "
                                              f"{list(want)}")
                    pieces.append(self._read(part, index, index + 1)[0] if index is not None
                                  else self._read(part, 0, size[0]))
                return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        return None

    def get(self, names: list[str], global_shape: tuple[int, ...]) -> torch.Tensor:
        for name in names:
            tensor = self._stored(name, global_shape)
            if tensor is not None:
                return tensor
        raise CheckpointError(f"{self.directory}: no {' or '.join(names)} in the checkpoint")


def open_megatron(root: str, step: int | None = None):
    """The checkpoint the tracker of ``root`` (or ``step``) names, as a LegacyCheckpoint or DistCheckpoint."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{root} is not a directory")
    directory, iteration = megatron.iteration_directory(root, step)
    kind = megatron.checkpoint_format(directory)
    if kind == "torch_dist":
        regular_file(os.path.join(directory, ".metadata"))
        source = DistCheckpoint(directory)
    else:
        source = LegacyCheckpoint(directory)
    source.iteration = iteration
    return source

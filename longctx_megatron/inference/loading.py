"""The model to generate from, on this rank's tensor-parallel shard: from a native checkpoint saved
under any layout (each rank reads its slices: resharded on load), or from a Hugging Face Llama or
Mistral directory through the conversion mapping (checkpoint/hf.py). Pipeline stages are not used
for inference: every rank holds the whole layer stack of its tensor shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from longctx_megatron.checkpoint import state
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.hf import ConversionError, config_from_hf, layer_from_hf, outer_from_hf
from longctx_megatron.checkpoint.hf_directory import HFCheckpoint, is_hf_directory
from longctx_megatron.checkpoint.reader import read_json
from longctx_megatron.checkpoint.sharded import Checkpointer
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.serialization import config_from_dict
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.state import ParallelContext, check_model_fits_layout
from longctx_megatron.parallel.tensor import tensor_parallel_shards


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    source: str  # what was loaded, for the log
    tokenizer: dict | None  # the checkpoint's {"name", "checksum"}, if it recorded one


def load_model(path: str, ctx: ParallelContext, device: torch.device, dtype: torch.dtype | None = None,
               backend: str = "auto", step: int | None = None, log=print) -> LoadedModel:
    """``path``: a --save directory (its newest sound checkpoint, or ``step``) or a Hugging Face
    directory. ``dtype`` None keeps the checkpoint's. Every rank of ``ctx`` calls this together."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path}: no such directory")
    if is_hf_directory(path):
        return _load_hf(path, ctx, device, dtype, backend)
    reader = Checkpointer(None, log=log).find(path, step)
    if reader is None:
        raise CheckpointError(f"--load {path}: no checkpoint there (neither a --save directory nor a Hugging Face "
                              "directory with config.json and model.safetensors)")
    metadata = reader.checkpoint_metadata()
    config = config_from_dict(metadata.training.config)
    check_model_fits_layout(config, ctx.tp_size)
    dtype = dtype or getattr(torch, metadata.training.params_dtype)
    model = build_parallel_model(config, ctx, device, attention_backend=backend, dtype=dtype)
    state.load([model], None, ctx, device, reader, steps=0, load_optimizer=False, load_rng=False)
    reader.close()
    layout = metadata.training.layout
    return LoadedModel(model.eval(), config, f"{reader.directory} (iteration {metadata.iteration}, saved under "
                       f"tensor {layout.tensor} x pipeline {layout.pipeline})", metadata.training.tokenizer)


def _load_hf(path: str, ctx: ParallelContext, device, dtype, backend: str) -> LoadedModel:
    config_path = os.path.join(path, "config.json")
    config = config_from_hf(read_json(config_path), config_path)
    check_model_fits_layout(config, ctx.tp_size)
    source = HFCheckpoint(path)
    model = build_parallel_model(config, ctx, "meta", attention_backend=backend)
    shards = tensor_parallel_shards(model)
    outer = outer_from_hf(source.get, config)
    model.to_empty(device=device).to(dtype or outer["final_norm.weight"].dtype)
    params = dict(model.named_parameters())

    def groups():  # the outer tensors, then one layer at a time: memory holds the model and one layer
        yield outer
        for index in range(config.n_layers):
            yield layer_from_hf(index, source.get, config)

    with torch.no_grad():
        for group in groups():
            for name, full in group.items():
                params.pop(name).copy_(shards[name].take(full) if name in shards else full)
    if params:
        raise ConversionError(f"{path}: no Hugging Face tensor maps to {', '.join(sorted(params)[:5])}")
    return LoadedModel(model.eval(), config, f"{path} (Hugging Face {config.n_layers} layers)", None)

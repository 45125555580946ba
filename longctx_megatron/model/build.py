"""Build a GPTModel on the meta device, then materialise and initialise it parameter by parameter.

``build_model`` is the plain model; a parallel one is built on meta, parallelized, then
materialised with each rank's slices (parallel/parallelize.py: ``build_parallel_model``).
"""

from __future__ import annotations

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.init import initialize_parameters
from longctx_megatron.model.transformer import GPTModel


def build_model(
    config: ModelConfig,
    device: str | torch.device = "cpu",
    seed: int = 1234,
    attention_backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    layers: range | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """``device="meta"`` gives a shape-only model (counting, planning, parallelizing) that allocates
    nothing. ``layers``, ``pre_process`` and ``post_process`` select a pipeline stage (see GPTModel)."""
    with torch.device("meta"):
        model = GPTModel(config, attention_backend, layers, pre_process, post_process)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device, seed, dtype)


def materialize(model: GPTModel, device: str | torch.device, seed: int, dtype: torch.dtype, shards=None) -> GPTModel:
    """Allocate a meta model's parameters on ``device`` and fill each from its global tensor; a
    parameter named in ``shards`` (name -> object with ``global_shape`` and ``take``, e.g. a
    tensor-parallel ShardSpec) gets its slice of that tensor. Returns the model in ``dtype``."""
    model.to_empty(device=device)
    initialize_parameters(model, model.config, seed, shards)
    return model.to(dtype)

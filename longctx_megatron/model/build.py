"""Build a GPTModel on the meta device, then materialise and initialise it parameter by parameter."""

from __future__ import annotations

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.init import initialize_parameters
from longctx_megatron.model.transformer import GPTModel
from longctx_megatron.parallel.random import model_parallel_rng
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import apply_tensor_parallel, tensor_parallel_shards


def build_model(
    config: ModelConfig,
    device: str | torch.device = "cpu",
    seed: int = 1234,
    attention_backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    parallel: ParallelContext | None = None,
    sequence_parallel: bool = False,
    layers: range | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> GPTModel:
    """``device="meta"`` gives a shape-only model (counting, planning) that allocates nothing.

    With ``parallel``, the model is this rank's tensor-parallel shard; its RNG tracker (dropout
    inside sharded regions) is ``model.rng_tracker``, seeded from ``seed``. ``layers``,
    ``pre_process`` and ``post_process`` select a pipeline stage (see GPTModel).
    """
    with torch.device("meta"):
        model = GPTModel(config, attention_backend, layers, pre_process, post_process)
    if parallel is not None:
        model.rng_tracker = model_parallel_rng(seed, parallel.tp_rank, parallel.pp_rank, torch.device(device).type)
        apply_tensor_parallel(model, parallel, model.rng_tracker, sequence_parallel)
    if torch.device(device).type == "meta":
        return model
    shards = tensor_parallel_shards(model)
    model.to_empty(device=device)
    initialize_parameters(model, config, seed, shards)
    return model.to(dtype)

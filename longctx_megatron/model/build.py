"""Build a GPTModel on the meta device, then materialise and initialise it parameter by parameter."""

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
) -> GPTModel:
    """``device="meta"`` gives a shape-only model (counting, planning) that allocates nothing."""
    with torch.device("meta"):
        model = GPTModel(config, attention_backend)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    initialize_parameters(model, config, seed)
    return model.to(dtype)

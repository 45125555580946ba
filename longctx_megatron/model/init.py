"""Parameter initialisation defined on global tensors, one parameter at a time.

Each parameter's values come from a generator seeded by (seed, global parameter name), so they do
not depend on construction order, device or parallel layout: a tensor-parallel rank takes its slice
of the same global tensor, and memory peaks at one tensor even for the 7B model. A fused weight
(model/fused.py) is initialised as its declared ``parts`` stacked matrices: the fan-out is one part's.
"""

from __future__ import annotations

import hashlib
import math

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.fused import fused_layouts

# Projections writing into the residual stream get std / sqrt(2 * n_layers) (GPT-2 / Megatron).
OUTPUT_PROJECTIONS = ("attention.out.weight", "mlp.down.weight")


def parameter_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(name: str, shape: torch.Size, config: ModelConfig, parts: int = 1) -> float | None:
    """Standard deviation of parameter ``name``'s normal init (``parts`` stacked matrices of equal
    height); None for norm weights (ones; zeros when they hold gamma - 1)."""
    if len(shape) == 1:
        return None
    fan_out, fan_in = shape
    fan_out //= parts
    if config.init_method == "xavier":
        std = math.sqrt(2.0 / (fan_in + fan_out))
    elif config.init_method == "kaiming":
        std = 1.0 / math.sqrt(fan_in)
    else:
        std = config.init_std
    if name.endswith(OUTPUT_PROJECTIONS):
        std /= math.sqrt(2.0 * config.n_layers)
    return std


def init_global_tensor(name: str, shape: torch.Size, config: ModelConfig, seed: int, parts: int = 1) -> torch.Tensor:
    """The float32 CPU value of global parameter ``name`` (``parts`` as its fused layout declares)."""
    std = init_std(name, shape, config, parts)
    if std is None:
        return torch.zeros(shape) if config.norm_zero_centered_gamma else torch.ones(shape)
    generator = torch.Generator().manual_seed(parameter_seed(seed, name))
    return torch.randn(shape, generator=generator) * std


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, config: ModelConfig, seed: int, shards=None) -> None:
    """Fill every parameter from its global tensor.

    ``shards`` maps the names of sharded parameters to objects with ``global_shape`` and
    ``take(global_tensor)`` (tensor parallelism's ShardSpec); those parameters get their slice.
    """
    shards, layouts = shards or {}, fused_layouts(model)
    for name, param in model.named_parameters():
        shard, parts = shards.get(name), layouts[name].parts if name in layouts else 1
        if shard is None:
            param.copy_(init_global_tensor(name, param.shape, config, seed, parts))
        else:
            param.copy_(shard.take(init_global_tensor(name, torch.Size(shard.global_shape), config, seed, parts)))

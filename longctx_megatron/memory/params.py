"""Parameter counts on one tensor-parallel rank: the one definition the training and inference estimates
(and the planner's cost model) read."""

from __future__ import annotations

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.model.counting import layer_matmul_params


def local_vocab(config: ModelConfig, tensor: int) -> int:
    """Vocabulary rows of this rank's embedding / output slice (padded to split evenly under TP)."""
    return padded_vocab_size(config.vocab_size, tensor) // tensor if tensor > 1 else config.vocab_size


def layer_params(config: ModelConfig, tensor: int) -> int:
    """One layer's parameters on one rank: its projections split over ``tensor`` ranks (the layout
    check guarantees they divide), its two RMSNorm weights whole."""
    return layer_matmul_params(config) // tensor + 2 * config.d_model

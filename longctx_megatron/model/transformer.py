"""The decoder: embedding, the heterogeneous block stack of the layer plan, final norm, tied output."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.block import TransformerBlock
from longctx_megatron.model.head import LanguageModelHead
from longctx_megatron.model.norm import RMSNorm


class GPTModel(torch.nn.Module):
    """``dropout_rng`` is the context for embedding dropout (per-rank under sequence parallelism)."""

    def __init__(self, config: ModelConfig, attention_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.dropout_rng = contextlib.nullcontext
        self.embedding = torch.nn.Embedding(config.vocab_size, config.d_model)
        self.layers = torch.nn.ModuleList(
            TransformerBlock(config, spec, attention_backend) for spec in config.layer_plan()
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = None if config.tie_embeddings else torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head = LanguageModelHead()

    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.output is None else self.output.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) -> (logits (B, T, V), mean loss over loss_mask or None without labels).

        Under tensor parallelism the logits are this rank's vocabulary shard.

        ``labels`` are the next tokens (already shifted, as the datasets return them);
        ``position_ids`` (B, T) default to 0..T-1 and may restart at document boundaries.
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        p = self.config.hidden_dropout if self.training else 0.0
        hidden = self.embedding(input_ids)
        with self.dropout_rng():
            hidden = F.dropout(hidden, p)
        rope_tables = {}  # layers sharing a RoPE config share one cos/sin table
        for layer in self.layers:
            rotary = layer.attention.rotary
            if rotary.cfg not in rope_tables:
                rope_tables[rotary.cfg] = rotary(position_ids)
            hidden = layer(hidden, *rope_tables[rotary.cfg])
        return self.head(self.final_norm(hidden), self.output_weight(), labels, loss_mask)

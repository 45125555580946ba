"""Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.attention.layer import SelfAttention
from longctx_megatron.model.mlp import SwiGLU
from longctx_megatron.model.norm import RMSNorm

RECOMPUTE_GRANULARITIES = ("none", "selective", "full")


class TransformerBlock(torch.nn.Module):
    """``dropout_rng`` is the context for hidden dropout (a per-rank generator under sequence parallelism).

    ``recompute`` trades compute for activation memory (Megatron's --recompute-granularity):
    "full" keeps only the block's input and recomputes the whole block in backward; "selective"
    recomputes only the attention (its scores and softmax dominate memory at long context).
    """

    def __init__(self, config: ModelConfig, spec: LayerSpec, attention_backend: str = "auto"):
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.dropout_rng = contextlib.nullcontext
        self.recompute = "none"
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = SelfAttention(
            config.d_model, config.n_heads, config.n_kv_heads, spec, config.attention_dropout, attention_backend
        )
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        p = self.hidden_dropout if self.training else 0.0
        normed = self.attention_norm(x)
        if self.recompute == "selective" and torch.is_grad_enabled():
            attention = checkpoint(self.attention, normed, cos, sin, use_reentrant=False)
        else:
            attention = self.attention(normed, cos, sin)
        with self.dropout_rng():
            x = x + F.dropout(attention, p)
        mlp = self.mlp(self.mlp_norm(x))
        with self.dropout_rng():
            return x + F.dropout(mlp, p)

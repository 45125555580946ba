"""Pre-norm transformer block: x + dropout(attn(norm(x))), then + dropout(mlp(norm(x)))."""

from __future__ import annotations

import torch

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.attention.layer import SelfAttention
from longctx_megatron.model.attention.patterns import Documents
from longctx_megatron.model.dropout import Dropout
from longctx_megatron.model.mlp import SwiGLU
from longctx_megatron.model.norm import RMSNorm


class TransformerBlock(torch.nn.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, attention_backend: str = "auto"):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_zero_centered_gamma)
        self.attention = SelfAttention(
            config.d_model, config.n_heads, config.n_kv_heads, spec, config.attention_dropout, attention_backend
        )
        self.attention_out_dropout = Dropout(config.hidden_dropout)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_zero_centered_gamma)
        self.mlp = SwiGLU(config.d_model, config.d_ff)
        self.mlp_out_dropout = Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None, cache=None) -> torch.Tensor:
        x = x + self.attention_out_dropout(self.attention(self.attention_norm(x), cos, sin, documents, cache))
        return x + self.mlp_out_dropout(self.mlp(self.mlp_norm(x)))

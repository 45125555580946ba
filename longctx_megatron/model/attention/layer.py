"""SelfAttention: fused grouped QKV projection, RoPE on q and k, pattern attention, output projection.

QKV layout (the one definition; checkpoints and tensor parallelism slice it): the output rows of
``qkv.weight`` are, for each KV head in order, its ``group_size`` query heads, then its key head,
then its value head, each ``head_dim`` rows. A contiguous slice of whole KV groups is therefore a
self-contained set of heads, which is what a tensor-parallel rank holds.
"""

from __future__ import annotations

import contextlib

import torch

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.patterns import Pattern, pattern_for
from longctx_megatron.model.rope import RotaryEmbedding, apply_rotary


def split_qkv(qkv: torch.Tensor, group_size: int, head_dim: int):
    """(B, T, n_kv * (group_size + 2) * head_dim) -> q (B, H, T, D), k and v (B, Hkv, T, D)."""
    batch, seq_len, _ = qkv.shape
    grouped = qkv.view(batch, seq_len, -1, group_size + 2, head_dim)
    q = grouped[:, :, :, :group_size].flatten(2, 3).transpose(1, 2)
    k = grouped[:, :, :, group_size].transpose(1, 2)
    v = grouped[:, :, :, group_size + 1].transpose(1, 2)
    return q, k, v


class SelfAttention(torch.nn.Module):
    """Head counts are read from the weights, so a tensor-parallel shard needs no other class.

    Set by the parallelizer: ``first_kv_head``, the global index of this module's first KV head, and
    ``dropout_rng``, the context in which attention dropout draws its masks.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        spec: LayerSpec,
        attention_dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.group_size = n_heads // n_kv_heads
        self.spec = spec
        self.attention_dropout = attention_dropout
        self.backend = backend
        self.first_kv_head = 0
        self.dropout_rng = contextlib.nullcontext
        self.qkv = torch.nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = torch.nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # A spec from ModelConfig.layer_plan() has its RoPE resolved; a bare spec gets the default.
        self.rotary = RotaryEmbedding(self.head_dim, spec.rope or RopeConfig())

    @property
    def n_kv_heads(self) -> int:
        return self.qkv.weight.shape[0] // ((self.group_size + 2) * self.head_dim)

    @property
    def pattern(self) -> Pattern:
        return pattern_for(self.spec, self.group_size, self.first_kv_head)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = split_qkv(self.qkv(x), self.group_size, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        pattern = self.pattern
        dropout_p = self.attention_dropout if self.training else 0.0
        backend = factory.select(self.backend, pattern, q, dropout_p)
        with self.dropout_rng():
            out = backend.attend(q, k, v, pattern, dropout_p)
        return self.out(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, backend={self.backend}"

"""SelfAttention: fused grouped QKV projection, RoPE on q and k, core attention, output projection.

QKV layout (``GroupedQKV``, the one definition; initialisation, tensor parallelism and the Hugging
Face mapping read it): the output rows of ``qkv.weight`` are, for each KV head in order, its
``group_size`` query heads, then its key head, then its value head, each ``head_dim`` rows. A
contiguous slice of whole KV groups is therefore a self-contained set of heads, which is what a
tensor-parallel rank holds (so the layout has 1 part: the rows split over ranks as they are).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.model.attention import factory
from longctx_megatron.model.attention.patterns import Documents, Pattern, pattern_for
from longctx_megatron.model.rope import RotaryEmbedding, apply_rotary


@dataclass(frozen=True)
class GroupedQKV:
    """The grouped QKV layout for ``group_size`` query heads per KV head of ``head_dim`` each."""

    group_size: int
    head_dim: int
    parts = 1  # whole KV groups are contiguous rows: a plain row split keeps heads together

    def rows(self, n_kv_heads: int) -> int:
        return n_kv_heads * (self.group_size + 2) * self.head_dim

    def pack(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The fused weight from separate q (H*D, d), k and v (Hkv*D, d) projection weights."""
        kv = k.shape[0] // self.head_dim
        grouped = [q.reshape(kv, self.group_size * self.head_dim, -1), k.reshape(kv, self.head_dim, -1),
                   v.reshape(kv, self.head_dim, -1)]
        return torch.cat(grouped, dim=1).reshape(-1, q.shape[-1])

    def unpack(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k and v projection weights of a fused weight: the inverse of ``pack``."""
        grouped = qkv.reshape(-1, self.group_size + 2, self.head_dim, qkv.shape[-1])
        kv = grouped.shape[0]
        return (grouped[:, :-2].reshape(kv * self.group_size * self.head_dim, -1),
                grouped[:, -2].reshape(kv * self.head_dim, -1), grouped[:, -1].reshape(kv * self.head_dim, -1))

    def split_heads(self, qkv: torch.Tensor):
        """Activations (B, T, rows) -> q (B, H, T, D), k and v (B, Hkv, T, D)."""
        batch, seq_len, _ = qkv.shape
        grouped = qkv.view(batch, seq_len, -1, self.group_size + 2, self.head_dim)
        q = grouped[:, :, :, :self.group_size].flatten(2, 3).transpose(1, 2)
        k = grouped[:, :, :, self.group_size].transpose(1, 2)
        v = grouped[:, :, :, self.group_size + 1].transpose(1, 2)
        return q, k, v


class CoreAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(D)) v under ``pattern`` by the selected backend (Megatron's core_attention).

    ``dropout_rng`` is the generator context attention dropout draws its masks in (a per-rank
    stream under tensor parallelism, where ranks hold different heads).
    """

    def __init__(self, pattern: Pattern, dropout: float = 0.0, backend: str = "auto",
                 dropout_rng: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__()
        self.pattern, self.dropout, self.backend, self.dropout_rng = pattern, dropout, backend, dropout_rng

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                documents: Documents | None = None) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        backend = factory.select(self.backend, self.pattern, q, dropout_p, documents)
        with self.dropout_rng():
            return backend.attend(q, k, v, self.pattern, dropout_p, documents)

    def extra_repr(self) -> str:
        return f"{self.pattern}, backend={self.backend}"


class SelfAttention(torch.nn.Module):
    """Head counts are read from the weights, so a tensor-parallel shard needs no other class.
    ``first_kv_head`` (a constructor argument, passed to the core attention's pattern) is the global
    index of the first KV head this module holds: 0 unsharded; tensor parallelism rebuilds the core
    attention with its rank's."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        spec: LayerSpec,
        attention_dropout: float = 0.0,
        backend: str = "auto",
        first_kv_head: int = 0,
    ):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.group_size = n_heads // n_kv_heads
        self.spec = spec
        self.layout = GroupedQKV(self.group_size, self.head_dim)
        self.qkv = torch.nn.Linear(d_model, self.layout.rows(n_kv_heads), bias=False)
        self.core_attention = CoreAttention(pattern_for(spec, self.group_size, first_kv_head), attention_dropout,
                                            backend)
        self.out = torch.nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        # A spec from ModelConfig.layer_plan() has its RoPE resolved; a bare spec gets the default.
        self.rotary = RotaryEmbedding(self.head_dim, spec.rope or RopeConfig())

    def fused_weights(self) -> dict[str, GroupedQKV]:
        return {"qkv": self.layout}

    @property
    def n_kv_heads(self) -> int:
        return self.qkv.weight.shape[0] // self.layout.rows(1)

    @property
    def pattern(self) -> Pattern:
        return self.core_attention.pattern

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: Documents | None = None, cache=None) -> torch.Tensor:
        """With ``cache`` (an inference LayerCache: the earlier tokens' keys of this layer), x is the
        next chunk of tokens: they attend over the cached keys and their own, and are cached."""
        q, k, v = self.layout.split_heads(self.qkv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core_attention(q, k, v, documents) if cache is None else cache.attend(q, k, v)
        return self.out(out.transpose(1, 2).flatten(2))

    def extra_repr(self) -> str:
        return self.spec.describe()

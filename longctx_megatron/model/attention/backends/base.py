"""What an attention backend is: a way to compute ``softmax(QK^T/sqrt(d)) V`` under a pattern.

Tensors are (batch, heads, seq, head_dim); K and V carry the KV heads (GQA: query head h reads
KV head h // group_size). Backends either compute a pattern whole (the dense reference) or provide
two primitives, causal attention and causal sliding-window attention, from which
:mod:`..decompose` builds every pattern (dilated by regrouping, global tokens by an LSE merge).
``documents`` (patterns.Documents, or None for one document per sample) restricts every pattern to
the documents packed in a sample; a backend that cannot honour it says so and is never used then.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from longctx_megatron.model.attention.patterns import Documents, Pattern


class BackendUnavailable(RuntimeError):
    """The selected backend cannot run here (missing package, wrong device, unsupported pattern)."""


class AttentionBackend(ABC):
    name: str = "?"

    def unsupported_reason(self, pattern: Pattern, q: torch.Tensor, dropout_p: float = 0.0,
                           documents: Documents | None = None) -> str | None:
        """Why this backend cannot run ``pattern`` on ``q``'s device/dtype with attention dropout
        ``dropout_p`` (and ``documents``), or None when it can."""
        return None

    def check(self, pattern: Pattern, q: torch.Tensor, dropout_p: float = 0.0,
              documents: Documents | None = None) -> None:
        reason = self.unsupported_reason(pattern, q, dropout_p, documents)
        if reason is not None:
            raise BackendUnavailable(f"attention backend {self.name!r} cannot run {pattern}: {reason}")

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, dropout_p: float = 0.0,
        documents: Documents | None = None,
    ) -> torch.Tensor:
        """Attention output (B, H, T, D) of q (B, H, T, D) over k, v (B, Hkv, T, D) under ``pattern``
        (within each of ``documents``)."""


class DecomposedBackend(AttentionBackend):
    """A backend defined by its two primitives; patterns are assembled in :mod:`..decompose`."""

    def attend(self, q, k, v, pattern, dropout_p=0.0, documents=None):
        from longctx_megatron.model.attention.decompose import attend_decomposed

        self.check(pattern, q, dropout_p, documents)
        return attend_decomposed(self, q, k, v, pattern, dropout_p, documents)

    @abstractmethod
    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Full causal attention (one document per sample; documents go through ``window``)."""

    @abstractmethod
    def window(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        segments: tuple[torch.Tensor, torch.Tensor] | None,
        need_lse: bool,
        dropout_p: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal sliding window: query i sees keys j with 0 <= i - j < window and, with ``segments``
        = (query ids, key ids), both (B, T) int64, q_ids[b, i] == k_ids[b, j] (a key id of -1 is a
        key no query sees: padding). ``window`` may be >= T (then it is causal attention).

        Returns (out, lse) where lse (B, H, T, float32, natural log) is given when ``need_lse`` and
        must carry gradients; rows with no visible key give out 0 and lse -inf.
        """

    def window_with_keys(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        segments: tuple[torch.Tensor, torch.Tensor] | None,
        k_extra: torch.Tensor,
        v_extra: torch.Tensor,
        extra_mask: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        """The window (as ``window``) plus, for query i, the extra keys c (B, Hkv, K, D) where
        ``extra_mask`` (T, K) or (B, T, K) is True; the two key sets must be disjoint (global tokens
        older than the window). By default: ``window`` with its LSE, merged with the extra keys."""
        from longctx_megatron.model.attention.decompose import window_with_keys_by_lse_merge

        return window_with_keys_by_lse_merge(self, q, k, v, window, segments, k_extra, v_extra, extra_mask, dropout_p)

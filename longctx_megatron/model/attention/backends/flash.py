"""flash-attn kernels (CUDA, fp16/bf16) for full and sliding-window layers, when importable.

flash-attn's ``window_size=(left, right)`` is inclusive, so W visible keys is ``(W - 1, 0)`` with
``causal=True``. Its log-sum-exp output carries no gradient, so patterns that need an LSE merge
(global tokens) or masked leading keys (dilated heads with offsets) are left to 'flex'/'chunked';
the 'auto' selection does that per layer.

Packed documents (full and sliding layers) go to ``flash_attn_varlen_func``: the batch is flattened
to one stream of B x T tokens and every document is a sequence of its own, delimited by
``cu_seqlens`` (int32 offsets of each document's first token, built once per forward from the
document ids and shared by the layers). Within a sequence flash counts positions from its start, the
document rule of patterns.py; a window of W keys is still ``(W - 1, 0)``.
"""

from __future__ import annotations

import torch

from longctx_megatron.model.attention.backends.base import BackendUnavailable, DecomposedBackend
from longctx_megatron.model.attention.patterns import DilatedPattern, Documents, SlidingPattern

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None


class FlashBackend(DecomposedBackend):
    name = "flash"

    def unsupported_reason(self, pattern, q, dropout_p=0.0, documents=None):
        if flash_attn_func is None:
            return "flash-attn is not installed (pip install -e '.[gpu]' on a CUDA machine)"
        if q.device.type != "cuda":
            return f"flash-attn runs on CUDA only (tensors are on {q.device})"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"flash-attn needs fp16 or bf16 tensors (got {q.dtype})"
        if isinstance(pattern, SlidingPattern) and pattern.global_every:
            return "global tokens need a log-sum-exp merge with gradients, which flash-attn lacks; use 'flex'"
        if isinstance(pattern, DilatedPattern):
            return "dilated heads with offsets need masked leading keys, which flash-attn lacks; use 'flex'"
        return None

    def attend(self, q, k, v, pattern, dropout_p=0.0, documents=None):
        if documents is None:
            return super().attend(q, k, v, pattern, dropout_p)
        self.check(pattern, q, dropout_p, documents)
        window_size = (pattern.window - 1, 0) if isinstance(pattern, SlidingPattern) else (-1, -1)
        return attend_varlen(flash_attn_varlen_func, q, k, v, documents, window_size, dropout_p)

    def causal(self, q, k, v, dropout_p):
        return self._run(q, k, v, dropout_p, (-1, -1))

    def window(self, q, k, v, window, segments, need_lse, dropout_p):
        if segments is not None or need_lse:
            raise BackendUnavailable("flash-attn cannot mask keys or return a differentiable LSE")
        return self._run(q, k, v, dropout_p, (window - 1, 0)), None

    @staticmethod
    def _run(q, k, v, dropout_p, window_size):
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=dropout_p, causal=True, window_size=window_size,
        )
        return out.transpose(1, 2)


def attend_varlen(kernel, q, k, v, documents: Documents, window_size: tuple[int, int], dropout_p: float):
    """Causal attention (window ``window_size``) within each document, by ``kernel`` with
    ``flash_attn_varlen_func``'s signature: tokens (B * T, heads, D), one sequence per document."""
    batch, n_heads, seq_len, head_dim = q.shape
    cu_seqlens, max_seqlen = documents.derived("cu_seqlens", lambda: _cu_seqlens(documents))

    def tokens(x):
        return x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], head_dim)

    out = kernel(tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                 dropout_p=dropout_p, causal=True, window_size=window_size)
    return out.view(batch, seq_len, n_heads, head_dim).transpose(1, 2)


def _cu_seqlens(documents: Documents) -> tuple[torch.Tensor, int]:
    """(offsets of every document's first token in the flattened batch, then B * T; int32) and the
    longest document's length. A document starts where its position within the document is 0, which
    includes every sample's first token; an empty document has no token and so no sequence."""
    starts = torch.nonzero(documents.positions.flatten() == 0).flatten()
    total = torch.tensor([documents.ids.numel()], device=starts.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

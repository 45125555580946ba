"""flash-attn kernels (CUDA, fp16/bf16) for full and sliding-window layers, when importable.

flash-attn's ``window_size=(left, right)`` is inclusive, so W visible keys is ``(W - 1, 0)`` with
``causal=True``. Its log-sum-exp output carries no gradient, so patterns that need an LSE merge
(global tokens) or masked leading keys (dilated heads with offsets) are left to 'flex'/'chunked';
the 'auto' selection does that per layer.
"""

from __future__ import annotations

import torch

from longctx_megatron.model.attention.backends.base import BackendUnavailable, DecomposedBackend
from longctx_megatron.model.attention.patterns import DilatedPattern, SlidingPattern

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


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
        if documents is not None:
            return "packed documents need flash_attn_varlen_func with cu_seqlens, not wired in yet; use 'flex'"
        return None

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

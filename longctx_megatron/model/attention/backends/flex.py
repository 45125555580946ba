"""FlexAttention block-sparse kernels (CUDA under torch.compile); the window mask comes from patterns.py.

Only the sliding-window primitive uses a block mask: global tokens would touch every 128x128 tile
and make the mask dense, so they are merged by log-sum-exp in decompose.py instead (FlexAttention's
LSE carries gradients). With packed documents the block mask carries the documents' ids, and is
built once per batch and window: the layers that share them share it. On CPU FlexAttention runs
eagerly, forward only (no backward), which is still useful to check masks against the oracle.
"""

from __future__ import annotations

import functools
import weakref

import torch

from longctx_megatron.model.attention.backends.base import DecomposedBackend
from longctx_megatron.model.attention.backends.chunked import sdpa_causal
from longctx_megatron.model.attention.patterns import FullPattern, SlidingPattern

try:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError:  # older torch
    flex_attention = None


_CACHED_MASKS = 8  # block masks kept: one per distinct window and document layout of the model


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


class FlexBackend(DecomposedBackend):
    name = "flex"

    def unsupported_reason(self, pattern, q, dropout_p=0.0, documents=None):
        if flex_attention is None:
            return "this torch has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        if q.device.type != "cuda" and q.requires_grad:
            return "FlexAttention has no backward pass on CPU; use 'chunked' to train on CPU"
        if dropout_p > 0.0 and not isinstance(pattern, FullPattern):
            return "FlexAttention has no attention dropout (windows need it); set attention_dropout=0 or use 'chunked'"
        if dropout_p > 0.0 and documents is not None:
            return "FlexAttention has no attention dropout (documents need a masked window); use 'chunked'"
        return None

    def causal(self, q, k, v, dropout_p):
        return sdpa_causal(q, k, v, dropout_p)

    def __init__(self):
        self._masks: list[tuple[tuple, tuple, object]] = []  # (key, weak refs to the ids, block mask)

    def window(self, q, k, v, window, segments, need_lse, dropout_p):
        block_mask = self._block_mask(window, segments, q.shape[0], q.shape[2], q.device)
        kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
        out, aux = kernel(q, k, v, block_mask=block_mask, enable_gqa=True, return_aux=AuxRequest(lse=True))
        return out, aux.lse

    def _block_mask(self, window: int, segments, batch: int, seq_len: int, device):
        """The block mask of a window over ``segments``, built once and reused while the same id
        tensors are passed again: every layer of a forward with that window (and the backward's
        recomputation) shares the one built for the batch's documents. The newest few are kept."""
        key = (window, batch, seq_len, str(device))
        ids = segments if segments is not None else ()
        for cached_key, refs, mask in self._masks:
            same_ids = len(refs) == len(ids) and all(ref() is x for ref, x in zip(refs, ids, strict=True))
            if cached_key == key and same_ids:
                return mask
        rule = SlidingPattern(window).mask_mod
        q_ids, k_ids = segments if segments is not None else (None, None)

        def mask_mod(b, h, q_idx, kv_idx):  # create_block_mask wants a plain function
            visible = rule(b, h, q_idx, kv_idx)
            return visible if segments is None else visible & (q_ids[b, q_idx] == k_ids[b, kv_idx])
        mask = create_block_mask(mask_mod, batch if segments is not None else None, None, seq_len, seq_len,
                                 device=device, _compile=device.type == "cuda")
        self._masks = [(key, tuple(weakref.ref(x) for x in ids), mask)] + self._masks[:_CACHED_MASKS - 1]
        return mask

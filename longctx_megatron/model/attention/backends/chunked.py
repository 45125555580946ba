"""Block-local attention in fused SDPA: O(T * W) time, CPU and GPU.

The sequence is cut into blocks of C (about W / 4) queries; block b attends to the W + C - 1 keys
its window can reach (plus, for global tokens, the global keys older than the window, so no LSE
merge is needed), under one boolean mask, in torch's scaled_dot_product_attention: doubling T
doubles the work instead of quadrupling it. The fused kernel keeps its inputs (key spans about
(W + C) / C times K and V), output and LSE for the backward pass, and the masks are T x (W + C)
booleans (per block with documents or global keys). Off CPU the masked grouped call goes to the
recomputing block kernel instead (``masked_sdpa``). Full causal attention without documents goes to
SDPA's causal kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.backends.base import BackendUnavailable, DecomposedBackend
from longctx_megatron.model.attention.backends.recompute import masked_sdpa, masked_sdpa_zero_empty


def sdpa_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal window attention (see DecomposedBackend.window) by fused SDPA on blocks, no LSE; with
    ``extra`` = (k_extra, v_extra, extra_mask), also those keys (DecomposedBackend.window_with_keys).

    Queries are cut into blocks of C (about W / 4); block b attends to the W + C - 1 keys its
    queries can reach (and the extra keys), so each query scores W + C - 1 keys instead of the 2W of
    block pairing, in SDPA's fused kernel (forward and backward) instead of separate ops. Without
    segments or extra keys only the first blocks, whose span starts before position 0, need a mask
    of their own; the others share one (C, S) band. A row with no visible key (a dilated head's
    first positions, padding) gets output 0.
    """
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    window = min(window, seq_len)
    block = min(max(64, window // 4), seq_len)
    span = window - 1 + block
    n_blocks = -(-seq_len // block)
    tail = n_blocks * block - seq_len
    rows = n_blocks * batch
    # Block-major rows (n * B): block b of every sample, so the first blocks are one leading slice.
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(batch, n_heads, n_blocks, block, head_dim).permute(2, 0, 1, 3, 4)
    q_blocks = q_blocks.reshape(rows, n_heads, block, head_dim)

    def spans(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, T, D) -> (n * B, Hkv, S, D)
        x = F.pad(x, (0, 0, window - 1, tail)).unfold(2, span, block)  # (B, Hkv, n, D, S)
        return x.permute(2, 0, 1, 4, 3).reshape(rows, n_kv, span, head_dim)

    def per_block(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, K, D) -> (n * B, Hkv, K, D), every block
        return x.expand(n_blocks, *x.shape).reshape(rows, *x.shape[1:])

    # Query a of a block vs key c of its span: distance i - j = a + W - 1 - c.
    distance = window - 1 + torch.arange(block, device=q.device)[:, None] - torch.arange(span, device=q.device)
    band = (distance >= 0) & (distance < window)  # (C, S)
    key_position = (torch.arange(n_blocks, device=q.device)[:, None] * block - (window - 1)
                    + torch.arange(span, device=q.device))  # (n, S)
    if segments is None and extra is None:
        head_blocks = min(n_blocks, -(-(window - 1) // block))  # blocks whose span starts before position 0
        head = head_blocks * batch
        head_mask = (band & (key_position[:head_blocks, None, :] >= 0)).repeat_interleave(batch, 0)[:, None]
        k_spans, v_spans = spans(k), spans(v)
        first = masked_sdpa(q_blocks[:head], k_spans[:head], v_spans[:head], head_mask, dropout_p)
        rest = masked_sdpa(q_blocks[head:], k_spans[head:], v_spans[head:], band, dropout_p)
        out = torch.cat([first, rest])
    else:
        mask = band & (key_position[:, None, :] >= 0)  # (n, C, S)
        if segments is not None:
            q_ids, k_ids = segments
            query_ids = F.pad(q_ids, (0, tail), value=-2).view(batch, n_blocks, block).transpose(0, 1)
            key_ids = F.pad(k_ids, (window - 1, tail), value=-1).unfold(1, span, block).transpose(0, 1)  # (n, B, S)
            mask = mask[:, None] & (query_ids[..., :, None] == key_ids[..., None, :])  # (n, B, C, S)
        else:
            mask = mask[:, None].expand(n_blocks, batch, block, span)
        k_all, v_all = spans(k), spans(v)
        if extra is not None:
            k_extra, v_extra, extra_mask = extra
            extra_mask = extra_mask if extra_mask.dim() == 3 else extra_mask[None]  # (B or 1, T, K)
            extra_mask = F.pad(extra_mask, (0, 0, 0, tail), value=False).view(extra_mask.shape[0], n_blocks, block, -1)
            mask = torch.cat([mask, extra_mask.transpose(0, 1).expand(n_blocks, batch, block, -1)], dim=-1)
            k_all, v_all = torch.cat([k_all, per_block(k_extra)], dim=2), torch.cat([v_all, per_block(v_extra)], dim=2)
        out = masked_sdpa_zero_empty(q_blocks, k_all, v_all, mask.reshape(rows, 1, block, -1), dropout_p)
    out = out.view(n_blocks, batch, n_heads, block, head_dim).permute(1, 2, 0, 3, 4)
    return out.reshape(batch, n_heads, n_blocks * block, head_dim)[:, :, :seq_len]


def sdpa_causal(q, k, v, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)


class ChunkedBackend(DecomposedBackend):
    name = "chunked"

    def causal(self, q, k, v, dropout_p):
        return sdpa_causal(q, k, v, dropout_p)

    def window(self, q, k, v, window, segments, need_lse, dropout_p):
        if need_lse:
            raise BackendUnavailable("the chunked windows run in SDPA, which returns no LSE; global tokens come "
                                     "through window_with_keys")
        return sdpa_window_attention(q, k, v, window, segments, dropout_p), None

    def window_with_keys(self, q, k, v, window, segments, k_extra, v_extra, extra_mask, dropout_p):
        return sdpa_window_attention(q, k, v, window, segments, dropout_p, (k_extra, v_extra, extra_mask))

"""Pure-PyTorch block-local attention: O(T * W) time, O(T * D) activation memory, CPU and GPU.

The sequence is cut into blocks of C = min(W, T) queries; block b attends to key blocks b - 1 and
b, which hold every key its window can reach. Scores exist only for those 2C keys per query, so
doubling T doubles the work instead of quadrupling it, and they are recomputed in the backward
pass rather than stored (recompute.py). Full causal attention goes to SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.backends.base import DecomposedBackend
from longctx_megatron.model.attention.backends.recompute import block_attention


def _pair_blocks(x: torch.Tensor, n_blocks: int, block: int, dim: int) -> torch.Tensor:
    """Split ``dim`` (length (n+1)*C) into blocks and join each block with its predecessor: (..., n, 2C, ...)."""
    x = x.unflatten(dim, (n_blocks + 1, block))
    return torch.cat([x.narrow(dim, 0, n_blocks), x.narrow(dim, 1, n_blocks)], dim=dim + 1)


def chunked_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal window attention (see DecomposedBackend.window); returns (out, lse)."""
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv = k.shape[1]
    block = min(window, seq_len)
    n_blocks = -(-seq_len // block)
    tail = n_blocks * block - seq_len
    # One leading block of (invalid) keys lets block 0 look back like every other block.
    q_blocks = F.pad(q, (0, 0, 0, tail)).view(batch, n_kv, n_heads // n_kv, n_blocks, block, head_dim)
    k_blocks = _pair_blocks(F.pad(k, (0, 0, block, tail)), n_blocks, block, dim=2).unsqueeze(2)
    v_blocks = _pair_blocks(F.pad(v, (0, 0, block, tail)), n_blocks, block, dim=2).unsqueeze(2)
    # Query a of a block vs key c of its pair: distance i - j = C + a - c.
    distance = block + torch.arange(block, device=q.device)[:, None] - torch.arange(2 * block, device=q.device)
    in_window = (distance >= 0) & (distance < window)
    if segments is None:  # only the leading padding block is invalid, and only for block 0
        key_ids = _pair_blocks(F.pad(torch.zeros(1, seq_len, dtype=torch.long, device=q.device), (block, tail),
                                     value=-1), n_blocks, block, dim=1)  # (1, n, 2C)
        mask = (in_window & (key_ids[:, :, None, :] >= 0))[:, None, None]  # (1, 1, 1, n, C, 2C)
    else:
        q_ids, k_ids = segments
        query_ids = F.pad(q_ids, (0, tail), value=-2).view(batch, n_blocks, block)
        key_ids = _pair_blocks(F.pad(k_ids, (block, tail), value=-1), n_blocks, block, dim=1)  # (B, n, 2C)
        mask = (in_window & (query_ids[:, :, :, None] == key_ids[:, :, None, :]))[:, None, None]
    out, lse = block_attention(q_blocks, k_blocks, v_blocks, mask, dropout_p)
    out = out.reshape(batch, n_heads, n_blocks * block, head_dim)[:, :, :seq_len]
    lse = lse.reshape(batch, n_heads, n_blocks * block)[:, :, :seq_len]
    return out, lse


def sdpa_causal(q, k, v, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)


class ChunkedBackend(DecomposedBackend):
    name = "chunked"

    def causal(self, q, k, v, dropout_p):
        return sdpa_causal(q, k, v, dropout_p)

    def window(self, q, k, v, window, segments, need_lse, dropout_p):
        return chunked_window_attention(q, k, v, window, segments, dropout_p)

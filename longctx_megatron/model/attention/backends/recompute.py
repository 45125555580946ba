"""Block attention that keeps no score matrix for the backward pass: it recomputes it.

Forward and backward walk the query blocks in groups small enough (about 16 MiB of scores) to
stay in cache; only the output and its log-sum-exp are saved, so activation memory is O(T * D)
instead of O(T * W), and the working set no longer grows with T. The gradient is the usual
softmax-attention one, dS = P * (dO V^T - rowsum(dO * O) + dLSE), with dLSE carried so that the
LSE merge of global tokens stays differentiable. Used where a backend merges global keys by LSE
(flex) and, off CPU, for every masked grouped-query attention (``masked_sdpa``); with attention
dropout plain autograd is used (the recomputation would need the dropout mask replayed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.softmax import masked_attention

SCORES_PER_GROUP = 1 << 22  # float32 elements of one group's score tensor (16 MiB)


def _groups(q_blocks: torch.Tensor, k_blocks: torch.Tensor):
    """Slices of the block dimension (-3) so that one slice's scores hold about SCORES_PER_GROUP elements."""
    batch, n_kv, group_size, n_blocks, block, _ = q_blocks.shape
    per_block = batch * n_kv * group_size * block * k_blocks.shape[-2]
    step = max(1, SCORES_PER_GROUP // per_block)
    return [slice(start, start + step) for start in range(0, n_blocks, step)]


def _part(x: torch.Tensor, part: slice) -> torch.Tensor:
    """Blocks ``part`` of ``x`` along dim -3, or ``x`` itself when that dim is 1 (shared by all blocks)."""
    return x if x.shape[-3] == 1 else x[..., part, :, :]


class RecomputedBlockAttention(torch.autograd.Function):
    """(q (B, Hkv, g, n, C, D), k, v (B, Hkv, 1, n, K, D), mask (B, 1, 1, n, C, K)) -> (out, lse).

    k, v and mask may have n = 1: one key set shared by every query block (global tokens).
    """

    @staticmethod
    def forward(ctx, q_blocks, k_blocks, v_blocks, mask):
        compute = torch.float64 if q_blocks.dtype == torch.float64 else torch.float32
        out = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        lse = torch.empty(q_blocks.shape[:-1], dtype=compute, device=q_blocks.device)
        for part in _groups(q_blocks, k_blocks):
            idx, row_idx = (..., part, slice(None), slice(None)), (..., part, slice(None))
            out[idx], lse[row_idx] = masked_attention(
                q_blocks[idx].to(compute), _part(k_blocks, part), _part(v_blocks, part), _part(mask, part)
            )
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks, mask, out, lse)
        return out.to(q_blocks.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q_blocks, k_blocks, v_blocks, mask, out, lse = ctx.saved_tensors
        compute = out.dtype
        scale = q_blocks.shape[-1] ** -0.5
        shared = k_blocks.shape[-3] == 1 and q_blocks.shape[-3] > 1
        d_q = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        d_k = torch.zeros(k_blocks.shape, dtype=compute, device=k_blocks.device)
        d_v = torch.zeros(v_blocks.shape, dtype=compute, device=v_blocks.device)
        # Rows that saw no key have lse = -inf; +inf there makes their probabilities exactly 0.
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))
        for part in _groups(q_blocks, k_blocks):
            idx, row_idx = (..., part, slice(None), slice(None)), (..., part, slice(None))
            q, k, v = q_blocks[idx].to(compute), _part(k_blocks, part).to(compute), _part(v_blocks, part).to(compute)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            probs = torch.exp(scores.masked_fill_(~_part(mask, part), float("-inf")) - lse[row_idx][..., None])
            grad = d_out[idx].to(compute)
            v_grad = torch.matmul(probs.transpose(-1, -2), grad).sum(dim=2, keepdim=True)
            d_scores = torch.matmul(grad, v.transpose(-1, -2))
            row = (grad * out[idx]).sum(dim=-1, keepdim=True) - d_lse[row_idx][..., None].to(compute)
            d_scores = probs.mul_(d_scores.sub_(row)).mul_(scale)
            d_q[idx] = torch.matmul(d_scores, k)
            k_grad = torch.matmul(d_scores.transpose(-1, -2), q).sum(dim=2, keepdim=True)
            if shared:  # every block read the same keys: their gradients add up
                d_k += k_grad.sum(dim=-3, keepdim=True)
                d_v += v_grad.sum(dim=-3, keepdim=True)
            else:
                d_k[idx], d_v[idx] = k_grad, v_grad
        return d_q.to(q_blocks.dtype), d_k.to(k_blocks.dtype), d_v.to(v_blocks.dtype), None


def block_attention(q_blocks, k_blocks, v_blocks, mask, dropout_p: float = 0.0):
    """Attention of query blocks over their key blocks (shapes as RecomputedBlockAttention).

    Recomputes scores in the backward pass; with attention dropout it falls back to plain autograd
    (which keeps the scores), since the recomputation would need the dropout mask replayed.
    """
    if dropout_p > 0.0:
        return masked_attention(q_blocks, k_blocks, v_blocks, mask, dropout_p)
    return RecomputedBlockAttention.apply(q_blocks, k_blocks, v_blocks, mask)


def shared_key_attention(q, k, v, mask, dropout_p: float = 0.0, rows_per_block: int = 64):
    """Rows of q (B, Hkv, g, R, D) against one key set k, v (B, Hkv, 1, K, D) where mask (R, K), or
    per sample (B, R, K), is True.

    Rows are cut into blocks so scores are only ever materialised (and recomputed) a group at a time:
    activation memory O(R * D) instead of O(R * K). Returns (out (B, Hkv, g, R, D), lse (B, Hkv, g, R)).
    """
    rows = q.shape[-2]
    block = min(rows_per_block, rows)
    n_blocks = -(-rows // block)
    pad = n_blocks * block - rows
    q_blocks = F.pad(q, (0, 0, 0, pad)).unflatten(-2, (n_blocks, block))
    mask = mask if mask.dim() == 3 else mask[None]
    mask_blocks = F.pad(mask, (0, 0, 0, pad), value=False).view(mask.shape[0], 1, 1, n_blocks, block, -1)
    out, lse = block_attention(q_blocks, k.unsqueeze(-3), v.unsqueeze(-3), mask_blocks, dropout_p)
    return out.flatten(-3, -2)[..., :rows, :], lse.flatten(-2)[..., :rows]


def masked_sdpa_zero_empty(q, k, v, mask, dropout_p: float = 0.0) -> torch.Tensor:
    """``masked_sdpa`` where a row may have no visible key: it gets output 0 (SDPA's result for a fully
    masked row varies by kernel, so such a row is given one key, then zeroed)."""
    has_key = mask.any(-1, keepdim=True)
    if bool(has_key.all()):
        return masked_sdpa(q, k, v, mask, dropout_p)
    mask = mask.clone()
    mask[..., 0] |= ~has_key[..., 0]
    return masked_sdpa(q, k, v, mask, dropout_p) * has_key


def masked_sdpa(q, k, v, mask, dropout_p: float = 0.0, fused: bool | None = None) -> torch.Tensor:
    """softmax attention of q (N, H, R, D) over k, v (N, Hkv, K, D) where ``mask`` (broadcast to
    (N, 1, R, K), or per query head (N, H, R, K)) is True; every row must have a visible key.

    On CPU this is SDPA with ``enable_gqa`` (its fused kernel takes a mask and grouped heads: the
    measured fast path, ADR 0002). On CUDA SDPA runs a masked grouped call in its math kernel, which
    keeps every score in fp32 (tens of GB at 100K tokens), so there the recomputing block kernel
    above is used instead: O(R * D) memory, scores recomputed in the backward pass. ``fused``
    overrides the choice (tests compare the two)."""
    if fused if fused is not None else q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
    n, heads, rows, dim = q.shape
    n_kv = k.shape[1]
    per_head = mask.dim() == 4 and mask.shape[1] > 1
    mask = mask.expand(n, heads if per_head else 1, rows, k.shape[2])
    # (N, Hkv, g, 1, R, K) per query head, else (N, 1, 1, 1, R, K): one block of every row
    mask = mask.unflatten(1, (n_kv, heads // n_kv))[:, :, :, None] if per_head else mask[:, None, :, None]
    q_blocks = q.unflatten(1, (n_kv, heads // n_kv))[:, :, :, None]  # (N, Hkv, g, 1, R, D): one block
    out, _ = block_attention(q_blocks, k[:, :, None, None], v[:, :, None, None], mask, dropout_p)
    return out[:, :, :, 0].flatten(1, 2)

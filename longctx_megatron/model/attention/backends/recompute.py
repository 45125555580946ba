"""Block attention that keeps no score matrix for the backward pass: it recomputes it.

Forward and backward walk the query blocks in groups small enough (about 16 MiB of scores) to
stay in cache. A group's query heads and rows are folded into the rows of one matrix product with
their keys (``torch.matmul`` would copy broadcast keys once per query head and block), and its
scores are worked in place. Only the output and its log-sum-exp are saved, so activation memory is
O(T * D) instead of O(T * W), and the working set no longer grows with T. The gradient is the usual
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
ROWS_PER_BLOCK = 64  # most query rows of one block cut from a longer run of rows


def query_blocks(rows: int, scores_per_row: int) -> tuple[int, int]:
    """(rows per block, rows per group) when ``rows`` queries that each have ``scores_per_row`` scores
    (batch x heads x keys) are cut into blocks for the kernel below: at most ROWS_PER_BLOCK rows, and
    few enough (down to one) that a block's scores fit in SCORES_PER_GROUP; ``_groups`` then takes as
    many blocks at a time as still fit. ``masked_sdpa`` cuts its rows so; the memory model reads it."""
    scores_per_row = max(1, scores_per_row)  # an empty batch has no scores
    block = max(1, min(ROWS_PER_BLOCK, rows, SCORES_PER_GROUP // scores_per_row))
    return block, min(-(-rows // block), max(1, SCORES_PER_GROUP // (scores_per_row * block))) * block


def _groups(q_blocks: torch.Tensor, k_blocks: torch.Tensor):
    """Slices of the block dimension (-3) so that one slice's scores hold about SCORES_PER_GROUP elements."""
    batch, n_kv, group_size, n_blocks, block, _ = q_blocks.shape
    per_block = batch * n_kv * group_size * block * k_blocks.shape[-2]
    step = max(1, SCORES_PER_GROUP // per_block)
    return [slice(start, start + step) for start in range(0, n_blocks, step)]


def _part(x: torch.Tensor, part: slice) -> torch.Tensor:
    """Blocks ``part`` of ``x`` along dim -3, or ``x`` itself when that dim is 1 (shared by all blocks)."""
    return x if x.shape[-3] == 1 else x[..., part, :, :]


def _rows(x: torch.Tensor, shared: bool) -> torch.Tensor:
    """(B, Hkv, g, n, C, X) -> (B, Hkv, n, g * C, X), or (B, Hkv, 1, n * g * C, X) when the keys are
    shared by every block: each block's query heads and rows (every block's, for shared keys) become
    the rows of one matrix product with their keys, which ``torch.matmul`` would otherwise copy once
    per query head and block to broadcast them."""
    x = x.transpose(2, 3)
    return x.flatten(2, 4)[:, :, None] if shared else x.flatten(3, 4)


def _unrows(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_rows``: back to the (B, Hkv, g, n, C, X) layout of ``like`` (a view)."""
    batch, n_kv, group_size, n_blocks, block, _ = like.shape
    return x.view(batch, n_kv, n_blocks, group_size, block, x.shape[-1]).transpose(2, 3)


def _keys(x: torch.Tensor, part: slice, compute: torch.dtype) -> torch.Tensor:
    """Keys or values (B, Hkv, 1, n, K, D) of blocks ``part`` (all of them when shared), as (B, Hkv, n, K, D)."""
    return _part(x, part)[:, :, 0].to(compute)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Scaled scores of rows ``q`` (``_rows`` layout) over ``k``, -inf where ``mask`` (the blocks'
    (B, Hkv, g, n, C, K) layout of ``like``, broadcast) is False."""
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    _unrows(scores, like).masked_fill_(~mask, float("-inf"))
    return scores


class RecomputedBlockAttention(torch.autograd.Function):
    """(q (B, Hkv, g, n, C, D), k, v (B, Hkv, 1, n, K, D), mask (B, 1, 1, n, C, K)) -> (out, lse).

    k, v and mask may have n = 1: one key set shared by every query block (global tokens); the mask
    may also have one per KV head or query head. No autograd graph is kept here, so a group's scores
    are worked in place: one float32 score tensor at a time forward, two backward (P and dO V^T).
    """

    @staticmethod
    def forward(ctx, q_blocks, k_blocks, v_blocks, mask):
        compute = torch.float64 if q_blocks.dtype == torch.float64 else torch.float32
        shared = k_blocks.shape[-3] == 1
        out = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        lse = torch.empty((*q_blocks.shape[:-1], 1), dtype=compute, device=q_blocks.device)
        # Shared keys are read by every group: widened once, not once per group.
        k_all, v_all = (x.to(compute) if shared else x for x in (k_blocks, v_blocks))
        for part in _groups(q_blocks, k_blocks):
            idx = (..., part, slice(None), slice(None))
            like = q_blocks[idx]
            scores = _scores(_rows(like.to(compute), shared), _keys(k_all, part, compute), _part(mask, part), like)
            # The guarded softmax of softmax.masked_attention: a row with no visible key gets 0 and -inf.
            row_max = scores.amax(dim=-1, keepdim=True)
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
            probs = scores.sub_(row_max).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            has_keys = total > 0
            total = torch.where(has_keys, total, 1.0)
            out[idx] = _unrows(torch.matmul(probs.div_(total), _keys(v_all, part, compute)), like)
            lse[idx] = _unrows(torch.where(has_keys, total.log_() + row_max, float("-inf")), like)
        lse = lse[..., 0]
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks, mask, out, lse)
        return out.to(q_blocks.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q_blocks, k_blocks, v_blocks, mask, out, lse = ctx.saved_tensors
        compute = out.dtype
        scale = q_blocks.shape[-1] ** -0.5
        shared = k_blocks.shape[-3] == 1
        d_q = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        d_k = torch.zeros(k_blocks.shape, dtype=compute, device=k_blocks.device)
        d_v = torch.zeros(v_blocks.shape, dtype=compute, device=v_blocks.device)
        # Rows that saw no key have lse = -inf; +inf there makes their probabilities exactly 0.
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))[..., None]
        d_lse = d_lse[..., None].to(compute)
        k_all, v_all = (x.to(compute) if shared else x for x in (k_blocks, v_blocks))
        for part in _groups(q_blocks, k_blocks):
            idx = (..., part, slice(None), slice(None))
            like = q_blocks[idx]
            q, k, v = _rows(like.to(compute), shared), _keys(k_all, part, compute), _keys(v_all, part, compute)
            probs = _scores(q, k, _part(mask, part), like).sub_(_rows(lse[idx], shared)).exp_()
            grad = _rows(d_out[idx].to(compute), shared)
            v_grad = torch.matmul(probs.transpose(-1, -2), grad)  # summed over the query heads and rows
            row = (grad * _rows(out[idx], shared)).sum(dim=-1, keepdim=True) - _rows(d_lse[idx], shared)
            d_scores = probs.mul_(torch.matmul(grad, v.transpose(-1, -2)).sub_(row)).mul_(scale)
            d_q[idx] = _unrows(torch.matmul(d_scores, k), like)
            k_grad = torch.matmul(d_scores.transpose(-1, -2), q)
            key_idx = (slice(None), slice(None), 0, slice(None) if shared else part)
            d_k[key_idx] += k_grad  # shared keys: every group's gradients add up
            d_v[key_idx] += v_grad
        return d_q.to(q_blocks.dtype), d_k.to(k_blocks.dtype), d_v.to(v_blocks.dtype), None


def block_attention(q_blocks, k_blocks, v_blocks, mask, dropout_p: float = 0.0):
    """Attention of query blocks over their key blocks (shapes as RecomputedBlockAttention).

    Recomputes scores in the backward pass; with attention dropout it falls back to plain autograd
    (which keeps the scores), since the recomputation would need the dropout mask replayed.
    """
    if dropout_p > 0.0:
        return masked_attention(q_blocks, k_blocks, v_blocks, mask, dropout_p)
    return RecomputedBlockAttention.apply(q_blocks, k_blocks, v_blocks, mask)


def shared_key_attention(q, k, v, mask, dropout_p: float = 0.0, rows_per_block: int = ROWS_PER_BLOCK):
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
    above is used instead, its rows cut into blocks (``query_blocks``) that share the keys: scores
    only ever a group at a time (about SCORES_PER_GROUP), O(R * D) memory, recomputed in the backward
    pass. ``fused`` overrides the choice (tests compare the two)."""
    if fused if fused is not None else q.device.type == "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True)
    n, heads, rows, _ = q.shape
    n_kv, keys = k.shape[1], k.shape[2]
    if q.numel() == 0:  # no sequences (a chunked window's empty tail slice) or no rows: nothing to attend
        return q.new_zeros(q.shape)
    block = query_blocks(rows, n * heads * keys)[0]
    n_blocks = -(-rows // block)
    pad = n_blocks * block - rows
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(-1, -1, rows, keys)
    if pad:  # padding rows see no key: output 0, finite gradients, then dropped
        q, mask = F.pad(q, (0, 0, 0, pad)), F.pad(mask, (0, 0, 0, pad), value=False)
    mask = mask.unflatten(2, (n_blocks, block))  # (N or 1, H or 1, n, C, K)
    # (N or 1, Hkv, g, n, C, K) per query head, else (N or 1, 1, 1, n, C, K)
    mask = mask.unflatten(1, (n_kv, heads // n_kv)) if mask.shape[1] > 1 else mask[:, None]
    q_blocks = q.unflatten(1, (n_kv, heads // n_kv)).unflatten(3, (n_blocks, block))  # (N, Hkv, g, n, C, D)
    out, _ = block_attention(q_blocks, k[:, :, None, None], v[:, :, None, None], mask, dropout_p)
    return out.flatten(3, 4)[:, :, :, :rows].flatten(1, 2)

"""Block attention that keeps no score matrix for the backward pass: it recomputes it.

Forward and backward walk the query blocks in groups small enough (about 16 MiB of scores) to
stay in cache; only the output and its log-sum-exp are saved, so activation memory is O(T * D)
instead of O(T * W), and the working set no longer grows with T. The gradient is the usual
softmax-attention one, dS = P * (dO V^T - rowsum(dO * O) + dLSE), with dLSE carried so that the
LSE merge of global tokens stays differentiable. Used by the chunked backend when there is no
attention dropout (dropout would need its random mask replayed).
"""

from __future__ import annotations

import torch

from longctx_megatron.model.attention.softmax import masked_attention

SCORES_PER_GROUP = 1 << 22  # float32 elements of one group's score tensor (16 MiB)


def _groups(q_blocks: torch.Tensor, k_blocks: torch.Tensor):
    """Slices of the block dimension (-3) so that one slice's scores hold about SCORES_PER_GROUP elements."""
    batch, n_kv, group_size, n_blocks, block, _ = q_blocks.shape
    per_block = batch * n_kv * group_size * block * k_blocks.shape[-2]
    step = max(1, SCORES_PER_GROUP // per_block)
    return [slice(start, start + step) for start in range(0, n_blocks, step)]


class RecomputedBlockAttention(torch.autograd.Function):
    """(q (B, Hkv, g, n, C, D), k, v (B, Hkv, 1, n, K, D), mask (B, 1, 1, n, C, K)) -> (out, lse)."""

    @staticmethod
    def forward(ctx, q_blocks, k_blocks, v_blocks, mask):
        compute = torch.float64 if q_blocks.dtype == torch.float64 else torch.float32
        out = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        lse = torch.empty(q_blocks.shape[:-1], dtype=compute, device=q_blocks.device)
        for part in _groups(q_blocks, k_blocks):
            idx, row_idx = (..., part, slice(None), slice(None)), (..., part, slice(None))
            out[idx], lse[row_idx] = masked_attention(
                q_blocks[idx].to(compute), k_blocks[idx], v_blocks[idx], mask[idx]
            )
        ctx.save_for_backward(q_blocks, k_blocks, v_blocks, mask, out, lse)
        return out.to(q_blocks.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q_blocks, k_blocks, v_blocks, mask, out, lse = ctx.saved_tensors
        compute = out.dtype
        scale = q_blocks.shape[-1] ** -0.5
        d_q = torch.empty(q_blocks.shape, dtype=compute, device=q_blocks.device)
        d_k = torch.empty(k_blocks.shape, dtype=compute, device=k_blocks.device)
        d_v = torch.empty(v_blocks.shape, dtype=compute, device=v_blocks.device)
        # Rows that saw no key have lse = -inf; +inf there makes their probabilities exactly 0.
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))
        for part in _groups(q_blocks, k_blocks):
            idx, row_idx = (..., part, slice(None), slice(None)), (..., part, slice(None))
            q, k, v = q_blocks[idx].to(compute), k_blocks[idx].to(compute), v_blocks[idx].to(compute)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            probs = torch.exp(scores.masked_fill_(~mask[idx], float("-inf")) - lse[row_idx][..., None])
            grad = d_out[idx].to(compute)
            d_v[idx] = torch.matmul(probs.transpose(-1, -2), grad).sum(dim=2, keepdim=True)
            d_scores = torch.matmul(grad, v.transpose(-1, -2))
            row = (grad * out[idx]).sum(dim=-1, keepdim=True) - d_lse[row_idx][..., None].to(compute)
            d_scores = probs.mul_(d_scores.sub_(row)).mul_(scale)
            d_q[idx] = torch.matmul(d_scores, k)
            d_k[idx] = torch.matmul(d_scores.transpose(-1, -2), q).sum(dim=2, keepdim=True)
        return d_q.to(q_blocks.dtype), d_k.to(k_blocks.dtype), d_v.to(v_blocks.dtype), None

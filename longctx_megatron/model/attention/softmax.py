"""Numerically guarded masked softmax attention that also returns the log-sum-exp.

Shared by the dense oracle and every pure-PyTorch branch (block-local windows, global tokens).
Scores are float32 (float64 for float64 inputs, so gradcheck works). A row with no visible key
yields output 0 and lse = -inf with finite gradients, where a plain ``logsumexp`` of an all-``-inf``
row would put NaN into the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (..., Hkv, g, Tq, D) over k, v (..., Hkv, 1, Tk, D) where ``mask`` is True.

    Leading dims broadcast (GQA: g query heads share one KV head without copying it). Returns
    (out in q's dtype, lse in the compute dtype of shape (..., Hkv, g, Tq)).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    has_keys = total > 0
    probs = weights / torch.where(has_keys, total, torch.ones_like(total))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, v.to(compute))
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    lse = torch.where(has_keys, torch.log(safe_total) + row_max, float("-inf"))
    return out.to(q.dtype), lse.squeeze(-1)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attentions over disjoint key sets into the attention over their union.

    Rows where one side saw no key take the other side unchanged; rows where neither did stay 0.
    """
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a = torch.exp(lse_a - top)
    weight_b = torch.exp(lse_b - top)
    total = weight_a + weight_b
    has_keys = total > 0
    safe_total = torch.where(has_keys, total, torch.ones_like(total))
    compute = torch.promote_types(out_a.dtype, torch.float32)
    out = out_a.to(compute) * (weight_a / safe_total)[..., None]
    out = out + out_b.to(compute) * (weight_b / safe_total)[..., None]
    lse = torch.where(has_keys, torch.log(safe_total) + top, float("-inf"))
    return out.to(out_a.dtype), lse

"""Attention of new queries over cached and new keys, by the training rule on absolute positions.

Prefill chunks and decode steps both come here: queries at positions ``q_pos`` (B, C) see the keys
a cache hands over (at ``k_pos`` (B, Hkv or 1, K), -1 for an empty slot; KV heads with the same offset hold keys
of the same positions) by the layer's own
``mask_mod`` from patterns.py, so the cache never has its own idea of what is visible: it only
decides which keys to hand over, and the rule masks the rest. The call itself is the training
code's masked attention (``recompute.masked_sdpa``: fused SDPA on CPU, the recomputing block kernel
elsewhere), once per group of KV heads that share a mask (dilated heads differ by their offset).
Queries at -1 (padding rows of a batch whose prompts differ in length) give 0.
"""

from __future__ import annotations

import torch

from longctx_megatron.model.attention.backends.recompute import masked_sdpa
from longctx_megatron.model.attention.patterns import DilatedPattern, Pattern


def attend_by_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                   pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, C, D), visible keys per query (B, H, C)) of q (B, H, C, D) over k, v (B, Hkv, K, D)."""
    n_heads, n_kv = q.shape[1], k.shape[1]
    group = n_heads // n_kv
    if isinstance(pattern, DilatedPattern):
        shifts = [pattern.kv_head_shift(h) for h in range(n_kv)]
        kv_groups = [[h for h in range(n_kv) if shifts[h] == s] for s in sorted(set(shifts))]
    else:
        kv_groups = [list(range(n_kv))]
    if len(kv_groups) == 1:  # one mask for every head: no copies of the heads
        return _attend_group(q, k, v, q_pos, k_pos[:, :1], pattern, 0)
    out = torch.empty_like(q)
    counts = torch.empty(q.shape[:3], dtype=torch.long, device=q.device)
    for kv_heads in kv_groups:
        q_heads = [h * group + g for h in kv_heads for g in range(group)]
        kv_index, q_index = torch.tensor(kv_heads, device=q.device), torch.tensor(q_heads, device=q.device)
        first = kv_heads[0] if k_pos.shape[1] > 1 else 0
        positions = k_pos[:, first:first + 1]  # (B, 1, K): heads of one offset hold keys of the same positions
        out[:, q_index], counts[:, q_index] = _attend_group(
            q[:, q_index], k[:, kv_index], v[:, kv_index], q_pos, positions, pattern, q_heads[0])
    return out, counts


def _attend_group(q, k, v, q_pos, k_pos, pattern, head):
    """Heads that share one visibility mask (``head`` is one of them, for a dilated rule's offset)."""
    i, j = q_pos[:, None, :, None], k_pos[:, :, None, :]
    visible = pattern.mask_mod(0, head, i, j) & (j >= 0) & (i >= 0)  # (B, 1, C, K)
    counts = visible.sum(-1).expand(q.shape[:3])
    has_key = visible.any(-1, keepdim=True)
    if not bool(has_key.all()):  # an empty row sees key 0 (SDPA's fully masked rows vary by kernel), then is zeroed
        visible = visible.clone()
        visible[..., 0] |= ~has_key[..., 0]
    out = masked_sdpa(q, k, v, visible, 0.0)
    return out * has_key.to(out.dtype), counts

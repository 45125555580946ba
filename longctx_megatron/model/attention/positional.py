"""Attention of queries at given sequence positions over keys at given positions, under a pattern.

Context parallelism (parallel/context.py) holds a part of every sample: its queries sit at known
global positions, and the keys it has (its own, a received halo, global tokens, a ring step's
block) at others. This computes the exact attention of such queries over such keys with the
pattern's own rule (``mask_mod`` on global positions; with packed documents the document rule on
the whole sample's ``Documents``), and returns the log-sum-exp, so that attentions over disjoint
key sets can be merged (``softmax.merge_by_lse``). No collectives: plain tensors in and out.

Queries are cut into blocks of ``block``; with a finite ``reach`` (the largest i - j + 1 a pattern
allows outside its global tokens, ``Pattern.reach``) a block scores only the keys in
[first - reach + 1, last] of its positions plus the ``always`` keys older than that (global
tokens), gathered per block: O(T * (reach + block)) work. Without a reach every block scores every
key up to the last query (one shared key set, masked). With the log-sum-exp, scores are recomputed in backward
(recompute.block_attention), so memory is O(T * D) plus the masks; without it (``need_lse=False``)
the blocks go to SDPA's fused kernel on CPU (``masked_sdpa``, several times faster there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.backends.recompute import block_attention, masked_sdpa_zero_empty
from longctx_megatron.model.attention.patterns import DilatedPattern, Documents, Pattern, document_mask_mod

BLOCK = 128  # queries per block


def attend_at_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, q_pos: torch.Tensor,
                        k_pos: torch.Tensor, documents: Documents | None = None, reach: int | None = None,
                        always: torch.Tensor | None = None, dropout_p: float = 0.0, block: int = BLOCK,
                        need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q (B, H, Tq, D) at positions ``q_pos`` (Tq,), ascending when ``reach`` is given (in any order
    otherwise: the global queries a rank answers arrive peer by peer), over k, v (B, Hkv, Tk, D) at ``k_pos``
    (Tk,), ascending, where ``pattern`` (within ``documents``, indexed by these positions) allows.
    The caller guarantees that a key the rule shows a query lies within ``reach`` of it or is
    marked in ``always`` (Tk,) bool. Returns (out (B, H, Tq, D), lse (B, H, Tq) float32, float64 for
    float64 inputs, or None unless ``need_lse``); a query that sees no key gets 0 and -inf."""
    batch, n_heads, rows, head_dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    if reach is None and rows:  # every pattern is causal: no key after the last query is visible to any
        seen = int(torch.searchsorted(k_pos, q_pos.max(), right=True))
        k, v, k_pos = k[:, :, :seen], v[:, :, :seen], k_pos[:seen]
    if rows == 0 or k.shape[2] == 0:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.zeros_like(q), torch.full((batch, n_heads, rows), float("-inf"), dtype=compute, device=q.device)
    block = min(block, rows)
    n_blocks = -(-rows // block)
    pad = n_blocks * block - rows
    q_blocks = F.pad(q, (0, 0, 0, pad)).view(batch, n_kv, group, n_blocks, block, head_dim)
    padded_pos = F.pad(q_pos, (0, pad), value=-1).view(n_blocks, block)  # padding queries: position -1 sees nothing
    if reach is None:
        key_pos = k_pos.expand(n_blocks, -1)
        valid = torch.ones_like(key_pos, dtype=torch.bool)
        k_blocks, v_blocks = k[:, :, None, None], v[:, :, None, None]  # shared by every block
    else:
        lo = padded_pos[:, :1] - reach + 1  # a block's first query is its earliest (padding only trails)
        hi = padded_pos.amax(-1, keepdim=True)
        selected = (k_pos >= lo) & (k_pos <= hi)
        if always is not None:
            selected |= always & (k_pos < lo)
        width = max(int(selected.sum(-1).max()), 1)
        index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :width]  # (n, S), selected first
        valid = selected.gather(1, index)
        key_pos = k_pos[index]
        flat = index.flatten()
        k_blocks = k[:, :, flat].view(batch, n_kv, 1, n_blocks, width, head_dim)
        v_blocks = v[:, :, flat].view(batch, n_kv, 1, n_blocks, width, head_dim)
    mask = _visible(pattern, documents, padded_pos, key_pos, n_kv, group, batch) & valid[:, None, :]
    if not need_lse:
        return _fused(q_blocks, k_blocks, v_blocks, mask, dropout_p)[:, :, :rows], None
    out, lse = block_attention(q_blocks, k_blocks, v_blocks, mask[:, :, None], dropout_p)
    out = out.reshape(batch, n_heads, n_blocks * block, head_dim)[:, :, :rows]
    return out, lse.reshape(batch, n_heads, n_blocks * block)[:, :, :rows]


def _fused(q_blocks, k_blocks, v_blocks, mask, dropout_p) -> torch.Tensor:
    """The blocks by ``masked_sdpa``: (B, Hkv, g, n, C, D) queries over (B, Hkv, 1, n or 1, S, D) keys
    under mask (B or 1, Hkv or 1, n, C, S) -> (B, H, n * C, D). A row with no visible key gets 0."""
    batch, n_kv, group, n_blocks, block, head_dim = q_blocks.shape
    width = k_blocks.shape[-2]
    q = q_blocks.permute(0, 3, 1, 2, 4, 5).reshape(batch * n_blocks, n_kv * group, block, head_dim)
    k, v = (x.expand(-1, -1, -1, n_blocks, -1, -1)[:, :, 0].transpose(1, 2).reshape(batch * n_blocks, n_kv, width,
                                                                                      head_dim)
            for x in (k_blocks, v_blocks))
    mask = mask.expand(batch, -1, -1, -1, -1).transpose(1, 2)  # (B, n, Hkv or 1, C, S)
    if mask.shape[2] > 1:
        mask = mask.repeat_interleave(group, dim=2)  # per KV head -> per query head
    out = masked_sdpa_zero_empty(q, k, v, mask.reshape(batch * n_blocks, mask.shape[2], block, width), dropout_p)
    return out.view(batch, n_blocks, n_kv * group, block, head_dim).transpose(1, 2).reshape(
        batch, n_kv * group, n_blocks * block, head_dim)


def _visible(pattern: Pattern, documents: Documents | None, q_pos: torch.Tensor, key_pos: torch.Tensor,
             n_kv: int, group: int, batch: int) -> torch.Tensor:
    """The rule for query blocks at q_pos (n, C) (-1: padding) and their keys at key_pos (n, S):
    (B or 1, Hkv or 1, n, C, S) bool."""
    qi, kj = q_pos[:, :, None].clamp_min(0), key_pos[:, None, :]
    rule = pattern.mask_mod if documents is None else document_mask_mod(pattern, documents)
    b = torch.arange(batch, device=q_pos.device).view(batch, 1, 1, 1) if documents is not None else 0
    heads = range(n_kv) if isinstance(pattern, DilatedPattern) else range(1)  # only dilation depends on the head
    masks = [rule(b, kv_head * group, qi, kj) & (q_pos[:, :, None] >= 0) for kv_head in heads]
    return torch.stack([m if m.dim() == 4 else m[None] for m in masks], dim=1)  # (B or 1, heads, n, C, S)

"""Every pattern from two primitives: causal attention and causal sliding-window attention.

* sliding + global tokens: local window (with its LSE), merged by log-sum-exp with the attention to
  the global keys older than the window (disjoint key sets, so the merge is exact); global queries
  see every earlier key and are written over their rows. Both extra branches cost O(T * T / G)
  time, small next to the window for the design's G = 128, and O(T * D) memory: their scores are
  recomputed in the backward pass (backends/recompute.py).
* dilated: heads are grouped by their offset s; keys are shifted s positions later, then
  (B, H, T, D) -> (B * r, H, T / r, D) puts each residue class in a contiguous sequence on which a
  causal window of W keys is exactly the rule in patterns.py. No score is computed twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.backends.recompute import shared_key_attention
from longctx_megatron.model.attention.patterns import DilatedPattern, Pattern, SlidingPattern
from longctx_megatron.model.attention.softmax import merge_by_lse


def attend_decomposed(backend, q, k, v, pattern: Pattern, dropout_p: float) -> torch.Tensor:
    if isinstance(pattern, SlidingPattern):
        if pattern.global_every:
            return _sliding_with_global_tokens(backend, q, k, v, pattern, dropout_p)
        return backend.window(q, k, v, pattern.window, None, False, dropout_p)[0]
    if isinstance(pattern, DilatedPattern):
        return _dilated(backend, q, k, v, pattern, dropout_p)
    return backend.causal(q, k, v, dropout_p)


def _grouped(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, g, T, D): each KV head's query heads side by side."""
    return q.unflatten(1, (n_kv_heads, q.shape[1] // n_kv_heads))


def _sliding_with_global_tokens(backend, q, k, v, pattern: SlidingPattern, dropout_p: float) -> torch.Tensor:
    seq_len, n_kv = q.shape[2], k.shape[1]
    positions = torch.arange(seq_len, device=q.device)
    globals_ = positions[:: pattern.global_every]  # position p is global iff p % G == 0

    out, lse = backend.window(q, k, v, pattern.window, None, True, dropout_p)

    # Global keys older than the query's window (the window already holds the younger ones).
    old_global = globals_[None, :] <= positions[:, None] - pattern.window
    k_glob, v_glob = k[:, :, None, globals_], v[:, :, None, globals_]
    out_glob, lse_glob = shared_key_attention(_grouped(q, n_kv), k_glob, v_glob, old_global, dropout_p)
    out, _ = merge_by_lse(out, lse, out_glob.flatten(1, 2), lse_glob.flatten(1, 2))

    # Global queries see every earlier position.
    q_glob = _grouped(q[:, :, globals_], n_kv)
    out_q, _ = shared_key_attention(
        q_glob, k[:, :, None], v[:, :, None], positions[None, :] <= globals_[:, None], dropout_p
    )
    return out.index_copy(2, globals_, out_q.flatten(1, 2))


def _dilated(backend, q, k, v, pattern: DilatedPattern, dropout_p: float) -> torch.Tensor:
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv, r = k.shape[1], pattern.dilation
    group = n_heads // n_kv
    shifts = [pattern.kv_head_shift(h) for h in range(n_kv)]
    padded = -(-seq_len // r) * r
    outputs, order = [], []
    for shift in sorted(set(shifts)):
        kv_heads = torch.tensor([h for h in range(n_kv) if shifts[h] == shift], device=q.device)
        q_heads = (kv_heads[:, None] * group + torch.arange(group, device=q.device)).flatten()
        # Key t of the shifted sequence is original key t - shift; the first `shift` are padding.
        qs = F.pad(q[:, q_heads], (0, 0, 0, padded - seq_len))
        ks = F.pad(k[:, kv_heads], (0, 0, shift, padded - seq_len - shift))
        vs = F.pad(v[:, kv_heads], (0, 0, shift, padded - seq_len - shift))
        key_valid = None
        if shift:
            key_valid = (torch.arange(padded, device=q.device) >= shift).view(-1, r).T  # (r, T/r)
            key_valid = key_valid.repeat(batch, 1)
        out, _ = backend.window(
            _to_residue_classes(qs, r), _to_residue_classes(ks, r), _to_residue_classes(vs, r),
            pattern.window, key_valid, False, dropout_p,
        )
        outputs.append(_from_residue_classes(out, r)[:, :, :seq_len])
        order.append(q_heads)
    out = torch.cat(outputs, dim=1)
    inverse = torch.empty(n_heads, dtype=torch.long, device=q.device)
    inverse[torch.cat(order)] = torch.arange(n_heads, device=q.device)
    return out[:, inverse]


def _to_residue_classes(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, T, D) -> (B * r, H, T / r, D); row b * r + c holds positions c, c + r, c + 2r, ..."""
    b, h, t, d = x.shape
    return x.view(b, h, t // r, r, d).permute(0, 3, 1, 2, 4).reshape(b * r, h, t // r, d)


def _from_residue_classes(x: torch.Tensor, r: int) -> torch.Tensor:
    br, h, n, d = x.shape
    return x.view(br // r, r, h, n, d).permute(0, 2, 3, 1, 4).reshape(br // r, h, n * r, d)

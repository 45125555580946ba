"""Every pattern from two primitives: causal attention and causal sliding-window attention.

* sliding + global tokens: the window and the global keys older than it (disjoint key sets) in one
  ``window_with_keys`` call: by default the window's LSE merged with the global keys' attention
  (exact), in chunked one SDPA call over both. Global queries see every earlier key and are written
  over their rows (``masked_sdpa``). Both extra branches cost O(T * T / G) time, small next to the
  window for the design's G = 128.
* dilated: heads are grouped by their offset s; keys are shifted s positions later, then
  (B, H, T, D) -> (B * r, H, T / r, D) puts each residue class in a contiguous sequence on which a
  causal window of W keys is exactly the rule in patterns.py. No score is computed twice.

With packed documents every primitive call carries segment ids (the window primitive's
``segments``): the window keeps keys of the query's document; full attention is a window as long
as the longest short document, and causal attention on each long document's own slice; global
tokens are each document's every G-th position, gathered per sample; dilated residue classes carry
their tokens' ids (padding gets -1, which no query matches). A window longer than the longest
document is cut to it first: the keys beyond are masked for every query, so no block scores them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from longctx_megatron.model.attention.backends.recompute import masked_sdpa, shared_key_attention
from longctx_megatron.model.attention.patterns import DilatedPattern, Documents, Pattern, SlidingPattern
from longctx_megatron.model.attention.softmax import merge_by_lse

LONG_DOCUMENT = 2048  # full attention in a document at least this long runs on the document's own slice


def attend_decomposed(backend, q, k, v, pattern: Pattern, dropout_p: float,
                      documents: Documents | None = None) -> torch.Tensor:
    segments = None
    if documents is not None:
        segments = (documents.ids, documents.ids)
        pattern = _window_cut_to_documents(pattern, documents)
    if isinstance(pattern, SlidingPattern):
        if pattern.global_every:
            return _sliding_with_global_tokens(backend, q, k, v, pattern, dropout_p, documents)
        return backend.window(q, k, v, pattern.window, segments, False, dropout_p)[0]
    if isinstance(pattern, DilatedPattern):
        return _dilated(backend, q, k, v, pattern, dropout_p, documents)
    if documents is not None:
        return _full_in_documents(backend, q, k, v, documents, dropout_p)
    return backend.causal(q, k, v, dropout_p)


def _window_cut_to_documents(pattern: Pattern, documents: Documents) -> Pattern:
    """The same rule with its window no longer than a document can use. Within a document i - j is
    less than its length L, so the keys of a window longer than the longest document (for dilation,
    longer than its (L - 1) // r + 1 keys per residue class) are masked for every query: chunked would
    score those key blocks and flex build mask blocks for them. Cut, the window holds exactly the
    keys the documents leave (one host sync per forward: the longest document is shared by the layers)."""
    longest = documents.derived("longest", lambda: int(documents.positions.max()) + 1)
    if isinstance(pattern, SlidingPattern) and pattern.window > longest:
        return dataclasses.replace(pattern, window=longest)
    if isinstance(pattern, DilatedPattern) and pattern.window > (longest - 1) // pattern.dilation + 1:
        return dataclasses.replace(pattern, window=(longest - 1) // pattern.dilation + 1)
    return pattern


def _full_in_documents(backend, q, k, v, documents: Documents, dropout_p: float) -> torch.Tensor:
    """Causal attention within each document. Within a document i - j < its length, so the documents
    shorter than LONG_DOCUMENT are one window as long as the longest of them (masks of T x that
    length); each longer one is causal attention on its own slice (no mask: a single 100K-token
    document would otherwise make the window, and its mask, T x T)."""
    segments = (documents.ids, documents.ids)
    starts_lengths = [(b, start, length) for b in range(q.shape[0])
                      for start, length in _starts_and_lengths(documents.lengths(b))]
    long = [(b, start, length) for b, start, length in starts_lengths if length >= LONG_DOCUMENT]
    short = max((length for _, _, length in starts_lengths if length < LONG_DOCUMENT), default=0)
    if not long:
        return backend.window(q, k, v, short, segments, False, dropout_p)[0]
    out = backend.window(q, k, v, short, segments, False, dropout_p)[0] if short else torch.zeros_like(q)
    for b, start, length in long:  # (rows of long documents from the window above are overwritten)
        piece = slice(start, start + length)
        out = out.index_copy(0, torch.tensor([b], device=q.device), _with_rows(
            out[b:b + 1], piece, backend.causal(q[b:b + 1, :, piece], k[b:b + 1, :, piece], v[b:b + 1, :, piece],
                                                dropout_p)))
    return out


def _starts_and_lengths(lengths: list[int]) -> list[tuple[int, int]]:
    starts, position = [], 0
    for length in lengths:
        starts.append((position, length))
        position += length
    return starts


def _with_rows(x: torch.Tensor, rows: slice, values: torch.Tensor) -> torch.Tensor:
    """``x`` with sequence positions ``rows`` replaced by ``values`` (out of place, differentiable)."""
    return torch.cat([x[:, :, :rows.start], values, x[:, :, rows.stop:]], dim=2)


def window_with_keys_by_lse_merge(backend, q, k, v, window, segments, k_extra, v_extra, extra_mask, dropout_p):
    """DecomposedBackend.window_with_keys from its window primitive: the window with its LSE, the
    extra keys by recomputed block attention, merged by log-sum-exp (the key sets are disjoint)."""
    out, lse = backend.window(q, k, v, window, segments, True, dropout_p)
    out_x, lse_x = shared_key_attention(_grouped(q, k.shape[1]), k_extra[:, :, None], v_extra[:, :, None],
                                        extra_mask, dropout_p)
    return merge_by_lse(out, lse, out_x.flatten(1, 2), lse_x.flatten(1, 2))[0]


def _grouped(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, Hkv, g, T, D): each KV head's query heads side by side."""
    return q.unflatten(1, (n_kv_heads, q.shape[1] // n_kv_heads))


def _sliding_with_global_tokens(backend, q, k, v, pattern: SlidingPattern, dropout_p: float,
                                documents: Documents | None) -> torch.Tensor:
    if documents is not None:
        return _sliding_with_global_tokens_in_documents(backend, q, k, v, pattern, dropout_p, documents)
    seq_len = q.shape[2]
    positions = torch.arange(seq_len, device=q.device)
    globals_ = positions[:: pattern.global_every]  # position p is global iff p % G == 0

    # The window, and the global keys older than the query's window (it holds the younger ones).
    old_global = globals_[None, :] <= positions[:, None] - pattern.window
    out = backend.window_with_keys(q, k, v, pattern.window, None, k[:, :, globals_], v[:, :, globals_], old_global,
                                   dropout_p)

    # Global queries see every earlier position (each sees itself, so no row is empty).
    out_q = masked_sdpa(q[:, :, globals_], k, v, positions[None, :] <= globals_[:, None], dropout_p)
    return out.index_copy(2, globals_, out_q)


def _sliding_with_global_tokens_in_documents(backend, q, k, v, pattern: SlidingPattern, dropout_p: float,
                                             documents: Documents) -> torch.Tensor:
    """The same three branches per sample: its global positions (every G-th of each document) differ
    from sample to sample, so they are gathered into a padded (B, K) index with a validity mask."""
    batch, n_heads, seq_len, head_dim = q.shape
    ids = documents.ids
    positions = torch.arange(seq_len, device=q.device)
    is_global = documents.positions % pattern.global_every == 0
    count = int(is_global.sum(dim=1).max())
    index = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :count]  # (B, K): globals first
    valid = is_global.gather(1, index)
    index_ids = ids.gather(1, index)

    # The window, and the global keys of the query's document older than its window.
    old_global = (valid[:, None, :] & (index_ids[:, None, :] == ids[:, :, None])
                  & (index[:, None, :] <= positions[None, :, None] - pattern.window))  # (B, T, K)
    out = backend.window_with_keys(q, k, v, pattern.window, (ids, ids), _gather_rows(k, index), _gather_rows(v, index),
                                   old_global, dropout_p)

    # Global queries see every earlier position of their document. Padding rows (not global) see key 0
    # (no row may be empty: SDPA's result for one differs by kernel) and go to an extra row then dropped.
    sees = (valid[:, :, None] & (positions[None, None, :] <= index[:, :, None])
            & (ids[:, None, :] == index_ids[:, :, None]))  # (B, K, T)
    sees[:, :, 0] |= ~valid
    out_q = masked_sdpa(_gather_rows(q, index), k, v, sees[:, None], dropout_p)
    target = torch.where(valid, index, seq_len)[:, None, :, None].expand(batch, n_heads, count, head_dim)
    out = F.pad(out, (0, 0, 0, 1)).scatter(2, target, out_q)
    return out[:, :, :seq_len]


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) at sequence positions index (B, K), per sample: (B, H, K, D)."""
    batch, heads, _, dim = x.shape
    return x.gather(2, index[:, None, :, None].expand(batch, heads, index.shape[1], dim))


def _dilated(backend, q, k, v, pattern: DilatedPattern, dropout_p: float,
             documents: Documents | None = None) -> torch.Tensor:
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
        segments = None
        if shift or documents is not None:
            ids = documents.ids if documents is not None else torch.zeros(batch, seq_len, dtype=torch.long,
                                                                           device=q.device)

            def residue_ids(ids=ids, shift=shift):
                q_ids = F.pad(ids, (0, padded - seq_len), value=-2)  # padding queries: dropped below
                k_ids = F.pad(ids, (shift, padded - seq_len - shift), value=-1)  # padding keys: seen by none
                return _ids_to_residue_classes(q_ids, r), _ids_to_residue_classes(k_ids, r)
            # One pair per (r, shift) for every layer of the forward (flex reuses its block mask for it).
            segments = (documents.derived(("residues", r, shift), residue_ids) if documents is not None
                        else residue_ids())
        out, _ = backend.window(
            _to_residue_classes(qs, r), _to_residue_classes(ks, r), _to_residue_classes(vs, r),
            pattern.window, segments, False, dropout_p,
        )
        outputs.append(_from_residue_classes(out, r)[:, :, :seq_len])
        order.append(q_heads)
    out = torch.cat(outputs, dim=1)
    inverse = torch.empty(n_heads, dtype=torch.long, device=q.device)
    inverse[torch.cat(order)] = torch.arange(n_heads, device=q.device)
    return out[:, inverse]


def _ids_to_residue_classes(ids: torch.Tensor, r: int) -> torch.Tensor:
    """(B, T) -> (B * r, T / r), the layout of ``_to_residue_classes``."""
    b, t = ids.shape
    return ids.view(b, t // r, r).permute(0, 2, 1).reshape(b * r, t // r)


def _to_residue_classes(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, H, T, D) -> (B * r, H, T / r, D); row b * r + c holds positions c, c + r, c + 2r, ..."""
    b, h, t, d = x.shape
    return x.view(b, h, t // r, r, d).permute(0, 3, 1, 2, 4).reshape(b * r, h, t // r, d)


def _from_residue_classes(x: torch.Tensor, r: int) -> torch.Tensor:
    br, h, n, d = x.shape
    return x.view(br // r, r, h, n, d).permute(0, 2, 3, 1, 4).reshape(br // r, h, n * r, d)

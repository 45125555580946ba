"""The one definition of each attention pattern's visibility rule.

Every rule is causal and written as a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)`` on
integer tensors, so the same function builds the dense oracle mask (broadcast index grids) and the
FlexAttention block mask. ``keys_per_query`` is the closed-form row count of the same rule, used for
FLOPs accounting and checked against the mask in the tests. ``h`` is the query head index local to
this module; dilated offsets follow the *global* KV head (``first_kv_head``), so tensor-parallel
shards see the same rule as the single-process model.

Rules (i = query position, j = key position, both sequence indices):

* full:    j <= i.
* sliding: 0 <= i - j < W, or (G > 0) j is global (j % G == 0) and j <= i, or i is global and j <= i.
* dilated: with s = (global KV head index) % r, d = i - j - s: d >= 0, d % r == 0 and d < W * r.
  Head groups with different offsets s cover every residue, so the union over heads of a query's
  keys is its whole span of W * r positions (see docs/decisions/0002-attention-patterns-and-backends.md).

Packed documents (``Documents``, ``--reset-attention-mask``): query i sees key j only if both are in
the same document, and then by the layer's rule applied to their positions *within* the document
(``document_mask_mod``). Window and dilation depend only on i - j, which is the same either way;
global tokens are every G-th position from the document's start. So a document's attention does not
depend on where packing put it (docs/decisions/0012-packed-documents.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.packing import document_lengths, document_positions


@dataclass(frozen=True)
class FullPattern:
    kind = "full"
    reach = None  # the largest i - j + 1 the rule allows outside global tokens: unbounded

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def keys_per_query(self, seq_len: int, head: int = 0) -> torch.Tensor:
        return torch.arange(1, seq_len + 1)


@dataclass(frozen=True)
class SlidingPattern:
    window: int
    global_every: int = 0
    kind = "sliding"

    @property
    def reach(self) -> int:
        """The largest i - j + 1 the rule allows between a query and a key that are not global tokens."""
        return self.window

    def is_global(self, idx):
        return (idx % self.global_every) == 0

    def mask_mod(self, b, h, q_idx, kv_idx):
        visible = (q_idx - kv_idx) < self.window
        if self.global_every:
            visible = visible | self.is_global(kv_idx) | self.is_global(q_idx)
        return (kv_idx <= q_idx) & visible

    def keys_per_query(self, seq_len: int, head: int = 0) -> torch.Tensor:
        i = torch.arange(seq_len)
        local = torch.clamp(i + 1, max=self.window)
        if not self.global_every:
            return local
        older_globals = torch.where(i >= self.window, (i - self.window) // self.global_every + 1, 0)
        return torch.where(self.is_global(i), i + 1, local + older_globals)


@dataclass(frozen=True)
class DilatedPattern:
    window: int
    dilation: int
    group_size: int = 1  # query heads per KV head
    first_kv_head: int = 0  # global index of this module's first KV head (tensor parallelism)
    kind = "dilated"

    @property
    def reach(self) -> int:
        """The largest i - j + 1 the rule allows for any head: i - j = d + s with d <= (W - 1) r, s < r."""
        return self.window * self.dilation

    def kv_head_shift(self, kv_head):
        """Offset of a local KV head: its global index modulo the dilation."""
        return (self.first_kv_head + kv_head) % self.dilation

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx - self.kv_head_shift(h // self.group_size)
        return (d >= 0) & (d % self.dilation == 0) & (d < self.window * self.dilation)

    def keys_per_query(self, seq_len: int, head: int = 0) -> torch.Tensor:
        i = torch.arange(seq_len)
        shift = self.kv_head_shift(head // self.group_size)
        reachable = torch.clamp((i - shift) // self.dilation + 1, max=self.window)
        return torch.where(i >= shift, reachable, 0)


Pattern = FullPattern | SlidingPattern | DilatedPattern


class Documents:
    """The documents packed into each sample: ``ids`` (B, T) int64, the document index of every token,
    non-decreasing along T (the data path's ``document_ids``). ``positions`` are the positions within
    each token's document; ``lengths(b)`` the document lengths of sample b in order. One object serves
    every layer of a forward; tensors derived from it (``derived``) are built once and shared, and the
    backends may cache masks by their identity, so ``ids`` must not be changed in place."""

    def __init__(self, ids: torch.Tensor):
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"document ids must be an int64 (B, T) tensor, got {ids.dtype} {tuple(ids.shape)}")
        self.ids = ids
        self.positions = document_positions(ids)
        self._derived: dict = {}

    def derived(self, key, build):
        """``build()``, computed on the first call with ``key`` and returned as the same object after."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def lengths(self, b: int) -> list[int]:
        return document_lengths(self.ids[b:b + 1])[0]


def document_mask_mod(pattern: Pattern, documents: Documents):
    """``pattern``'s rule restricted to each document, in positions counted from the document's start."""
    ids, positions = documents.ids, documents.positions

    def mask_mod(b, h, q_idx, kv_idx):
        same = ids[b, q_idx] == ids[b, kv_idx]
        return same & pattern.mask_mod(b, h, positions[b, q_idx], positions[b, kv_idx])

    return mask_mod


def keys_per_query_in_documents(pattern: Pattern, documents: Documents, head: int = 0) -> torch.Tensor:
    """Closed-form key count of every query (B, T) under the document rule: each document is a
    sequence of its own, so its rows are ``pattern.keys_per_query`` of its length."""
    rows = [torch.cat([pattern.keys_per_query(length, head) for length in documents.lengths(b)])
            for b in range(documents.ids.shape[0])]
    return torch.stack(rows)


def pattern_for(spec: LayerSpec, group_size: int = 1, first_kv_head: int = 0) -> Pattern:
    if spec.kind == "full":
        return FullPattern()
    if spec.kind == "sliding":
        return SlidingPattern(spec.window, spec.global_every)
    return DilatedPattern(spec.window, spec.dilation, group_size, first_kv_head)


def dense_mask(pattern: Pattern, seq_len: int, n_heads: int, device=None,
               documents: Documents | None = None) -> torch.Tensor:
    """Boolean visibility mask of ``pattern``, the O(T^2) oracle: (n_heads, T, T), or with
    ``documents`` (B, n_heads, T, T)."""
    idx = torch.arange(seq_len, device=device)
    heads = torch.arange(n_heads, device=device)[:, None, None]
    if documents is None:
        mask = pattern.mask_mod(0, heads, idx[None, :, None], idx[None, None, :])
        return mask.expand(n_heads, seq_len, seq_len)
    batch = documents.ids.shape[0]
    rule = document_mask_mod(pattern, documents)
    b = torch.arange(batch, device=device)[:, None, None, None]
    mask = rule(b, heads[None], idx[None, None, :, None], idx[None, None, None, :])
    return mask.expand(batch, n_heads, seq_len, seq_len)

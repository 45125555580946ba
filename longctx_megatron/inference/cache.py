"""KV caches, one kind per layer kind, each holding what the layer's rule can still read.

Keys are stored after RoPE, at their absolute positions, per sequence of the batch (sequences may
have different lengths). Every cache answers two questions for a chunk of new queries (a prefill
chunk, or one decode token per sequence): which stored keys could they see (``stored``), and where
the new keys go (``write``). What is visible among those keys is decided by the training rule
(inference/attention.py), so a cache can only hand over too few keys, never attend wrongly, and
the tests compare it with a full forward pass.

* full: every key, in a buffer grown in chunks of ``grow`` positions.
* sliding W, global every G: the last W keys in a ring (slot = position % W) and the keys of the
  global positions older than the ring. A global *query* sees every earlier key, so with G > 0 the
  cache also keeps the whole history (a full cache) on ``history_device``: the accelerator, or
  host memory (pinned on CUDA) from which the 1-in-G global steps fetch it (ADR 0013).
* dilated W, r: a ring of the last W * r keys (the span every offset's query reaches); a decode step
  gathers, per KV head, only the W keys its offset lets it see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx_megatron.inference.attention import attend_by_rule
from longctx_megatron.model.attention.patterns import DilatedPattern, FullPattern, Pattern, SlidingPattern

GROW = 1024  # positions a full cache grows by


@dataclass
class Reads:
    """What the last call of a layer's cache handed to attention: ``keys`` slots per KV head
    (stored and new), and ``visible`` (B, H, C) keys each query saw by the rule."""

    keys: int
    visible: torch.Tensor


def _scatter(store: torch.Tensor, slots: torch.Tensor, write: torch.Tensor, values: torch.Tensor) -> None:
    """store[b, :, slots[b, c]] = values[b, :, c] where write[b, c] (store (B, Hkv, S, D), values (B, Hkv, C, D))."""
    rows, cols = torch.nonzero(write, as_tuple=True)
    store[rows, :, slots[rows, cols]] = values[rows, :, cols]


class LayerCache:
    """One layer's cache for a batch: ``attend`` takes the chunk's q, k, v (after RoPE) at the
    positions ``positions`` (B, C; -1 for padding, set by KVCache.begin), attends and stores k, v."""

    def __init__(self, pattern: Pattern, batch: int, n_kv: int, head_dim: int, dtype, device):
        self.pattern, self.batch, self.n_kv, self.head_dim = pattern, batch, n_kv, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.positions: torch.Tensor | None = None
        self.last_reads: Reads | None = None

    def _buffer(self, slots: int, device=None, pinned: bool = False) -> torch.Tensor:
        return torch.zeros(self.batch, self.n_kv, slots, self.head_dim, dtype=self.dtype, device=device or self.device,
                           pin_memory=pinned)

    def stored(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v (B, Hkv, K, D), their positions (B, Hkv or 1, K), -1 = empty) that the queries at
        ``positions`` may see among the stored keys."""
        raise NotImplementedError

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        raise NotImplementedError

    def reserve(self, length: int) -> None:
        """Allocate now what sequences of ``length`` tokens will need (rings are allocated whole)."""

    def _grown(self, name: str, slots: int, device=None, pinned: bool = False) -> None:
        """Buffer ``name`` enlarged to ``slots`` positions, its contents kept."""
        old = getattr(self, name)
        if slots > old.shape[2]:
            grown = self._buffer(slots, device or old.device, pinned)
            grown[:, :, :old.shape[2]] = old
            setattr(self, name, grown)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: {"device": ..., "history": ...} (history: the sliding layers' global-query store)."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        positions = self.positions
        new = self._store_or_keep(k, v, positions)
        out, visible, keys = self._attend(q, positions, self.stored(positions), new)
        out, visible = self._other_queries(q, positions, out, visible, new)
        self.last_reads = Reads(keys, visible)
        if new is not None:
            self.write(k, v, positions)
        return out

    def _other_queries(self, q, positions, out, visible, new):
        """Queries whose keys are not all among ``stored``'s: recomputed elsewhere (sliding layers'
        global queries); by default there are none."""
        return out, visible

    def _store_or_keep(self, k, v, positions):
        """A decode step (one token per sequence) stores its key first and reads it back with the rest:
        the slot it takes in a ring held a key too old for that query (distance W, or W * r), so
        nothing visible is lost and no concatenation copies the stored keys. A prefill chunk's
        early queries may still need what its later keys would overwrite: its keys are kept aside
        (returned), attended with the stored ones, and stored after."""
        if positions.shape[1] == 1:
            self.write(k, v, positions)
            return None
        return k, v, positions

    def _attend(self, q, q_pos, stored, new=None):
        """Queries at q_pos over the stored keys, and the kept-aside new keys (k, v, positions) if any."""
        k_all, v_all, pos_all = stored
        if new is not None:
            k, v, k_pos = new
            pos_new = k_pos[:, None, :].expand(-1, pos_all.shape[1], -1)
            k_all, v_all = torch.cat([k_all.to(k.dtype), k], dim=2), torch.cat([v_all.to(v.dtype), v], dim=2)
            pos_all = torch.cat([pos_all, pos_new], dim=2)
        out, visible = attend_by_rule(q, k_all, v_all, q_pos, pos_all, self.pattern)
        return out, visible, k_all.shape[2]


class FullCache(LayerCache):
    def __init__(self, pattern, batch, n_kv, head_dim, dtype, device, grow: int = GROW, pinned: bool = False):
        super().__init__(pattern, batch, n_kv, head_dim, dtype, device)
        self.grow, self.pinned = grow, pinned
        self.k, self.v = self._buffer(0, pinned=pinned), self._buffer(0, pinned=pinned)
        self.lengths = torch.zeros(batch, dtype=torch.long)  # on the host: read every step to size the view

    def stored(self, positions, rows: torch.Tensor | None = None):
        lengths = self.lengths if rows is None else self.lengths[rows.cpu()]
        count = int(lengths.max()) if lengths.numel() else 0
        k, v = self.k[:, :, :count], self.v[:, :, :count]
        if rows is not None:
            k, v = k[rows.to(k.device)], v[rows.to(v.device)]
        slots = torch.arange(count)
        k_pos = torch.where(slots[None] < lengths[:, None], slots[None], -1)[:, None].to(positions.device)
        return k, v, k_pos

    def write(self, k, v, positions):
        write = positions >= 0
        if not bool(write.any()):
            return
        self.reserve(int(positions.max()) + 1)
        slots = positions.clamp(min=0).to(self.k.device)
        _scatter(self.k, slots, write.to(self.k.device), k.to(self.k.device, self.k.dtype))
        _scatter(self.v, slots, write.to(self.v.device), v.to(self.v.device, self.v.dtype))
        self.lengths = torch.maximum(self.lengths, (positions.max(dim=1).values + 1).cpu())

    def reserve(self, length):
        if length > self.k.shape[2]:
            for name in ("k", "v"):
                self._grown(name, -(-length // self.grow) * self.grow, pinned=self.pinned)

    def nbytes(self):
        return {"device": self.k.nbytes + self.v.nbytes, "history": 0}


class RingCache(LayerCache):
    """A cache of the last ``size`` keys of each sequence, in a ring: slot = position % size."""

    def __init__(self, pattern, batch, n_kv, head_dim, dtype, device, size: int):
        super().__init__(pattern, batch, n_kv, head_dim, dtype, device)
        self.ring_k, self.ring_v = self._buffer(size), self._buffer(size)
        self.ring_pos = torch.full((batch, size), -1, dtype=torch.long, device=self.device)  # -1: empty slot

    def _write_ring(self, k, v, positions) -> torch.Tensor:
        """Store k, v at their slots (a chunk longer than the ring keeps its last ``size`` keys) and
        their positions in ``ring_pos``; returns each row's last position."""
        size = self.ring_pos.shape[1]
        last = positions.max(dim=1, keepdim=True).values
        in_ring = (positions >= 0) & (positions > last - size)
        slots = positions.clamp(min=0) % size
        _scatter(self.ring_k, slots, in_ring, k)
        _scatter(self.ring_v, slots, in_ring, v)
        rows, cols = torch.nonzero(in_ring, as_tuple=True)
        self.ring_pos[rows, slots[rows, cols]] = positions[rows, cols]
        return last[:, 0]

    def _ring_bytes(self) -> int:
        return self.ring_k.nbytes + self.ring_v.nbytes + self.ring_pos.nbytes


class SlidingCache(RingCache):
    def __init__(self, pattern: SlidingPattern, batch, n_kv, head_dim, dtype, device, history_device=None,
                 grow: int = GROW):
        super().__init__(pattern, batch, n_kv, head_dim, dtype, device, pattern.window)
        self.window, self.every = pattern.window, pattern.global_every
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.history = None
        if self.every:
            self.global_k, self.global_v = self._buffer(0), self._buffer(0)
            self.n_globals = 0  # global positions stored (of the longest sequence): 0, G, 2G, ...
            history_device = torch.device(history_device or device)
            self.history_pinned = history_device.type == "cpu" and self.device.type == "cuda"
            self.history = FullCache(FullPattern(), batch, n_kv, head_dim, dtype, history_device, grow=grow,
                                     pinned=self.history_pinned)

    def stored(self, positions):
        """The ring, and the global keys older than it (those inside it would be handed over twice)."""
        if not self.every:
            return self.ring_k, self.ring_v, self.ring_pos[:, None]
        count = self.n_globals
        global_pos = torch.arange(count, device=self.device)[None] * self.every
        older = global_pos < (self.lengths[:, None] - self.window)  # below every slot of the ring
        global_pos = torch.where(older, global_pos, -1)
        return (torch.cat([self.ring_k, self.global_k[:, :, :count]], dim=2),
                torch.cat([self.ring_v, self.global_v[:, :, :count]], dim=2),
                torch.cat([self.ring_pos, global_pos], dim=1)[:, None])

    def _other_queries(self, q, positions, out, visible, new):
        if self.every:
            is_global = (positions >= 0) & (positions % self.every == 0)
            if bool(is_global.any()):
                return self._global_queries(q, positions, is_global, out, visible, new)
        return out, visible

    def _global_queries(self, q, positions, is_global, out, visible, new):
        """Global queries see every earlier key: they (one per G positions of the chunk at most)
        attend over the history, fetched for the rows that hold one; their rows are replaced."""
        rows = torch.nonzero(is_global.any(dim=1)).flatten()
        flags = is_global[rows]
        count = int(flags.sum(dim=1).max())
        index = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :count]  # (R, Cg): globals first
        valid = flags.gather(1, index)
        q_pos = torch.where(valid, positions[rows].gather(1, index), -1)
        heads, dim = q.shape[1], q.shape[3]
        q_rows = q[rows].gather(2, index[:, None, :, None].expand(-1, heads, -1, dim))
        k_old, v_old, pos_old = self.history.stored(q_pos, rows)
        k_old = k_old.to(self.device, non_blocking=self.history_pinned)
        v_old = v_old.to(self.device, non_blocking=self.history_pinned)
        new_rows = None if new is None else (new[0][rows], new[1][rows], new[2][rows])
        out_g, visible_g, _ = self._attend(q_rows, q_pos, (k_old, v_old, pos_old), new_rows)
        # Written back where the queries came from; the padding slots go to an extra column, then dropped.
        target = torch.where(valid, index, q.shape[2])
        out_rows = F.pad(out[rows], (0, 0, 0, 1)).scatter(2, target[:, None, :, None].expand(-1, heads, -1, dim), out_g)
        seen_rows = F.pad(visible[rows], (0, 1)).scatter(2, target[:, None, :].expand(-1, heads, -1), visible_g)
        out, visible = out.clone(), visible.clone()
        out[rows], visible[rows] = out_rows[:, :, :-1], seen_rows[:, :, :-1]
        return out, visible

    def write(self, k, v, positions):
        last = self._write_ring(k, v, positions)
        if self.every:
            is_global = (positions >= 0) & (positions % self.every == 0)
            if bool(is_global.any()):
                self.reserve(int(positions.max()) + 1)
                self.n_globals = max(self.n_globals, int(positions.max()) // self.every + 1)
                slots = positions.clamp(min=0) // self.every
                _scatter(self.global_k, slots, is_global, k)
                _scatter(self.global_v, slots, is_global, v)
            self.history.write(k, v, positions)
        self.lengths = torch.maximum(self.lengths, last + 1)

    def reserve(self, length):
        """Room for the global keys of ``length`` tokens (grown GROW positions' worth at a time) and the history."""
        if not self.every:
            return
        needed = -(-length // self.every)
        if needed > self.global_k.shape[2]:
            for name in ("global_k", "global_v"):
                self._grown(name, needed + max(1, GROW // self.every))
        self.history.reserve(length)

    def nbytes(self):
        held = self._ring_bytes()
        if not self.every:
            return {"device": held, "history": 0}
        held += self.global_k.nbytes + self.global_v.nbytes
        history = self.history.nbytes()["device"]
        on_device = self.history.k.device == self.device
        return {"device": held + (history if on_device else 0), "history": history}


class DilatedCache(RingCache):
    def __init__(self, pattern: DilatedPattern, batch, n_kv, head_dim, dtype, device):
        self.span = pattern.window * pattern.dilation
        super().__init__(pattern, batch, n_kv, head_dim, dtype, device, self.span)
        self.shifts = torch.tensor([pattern.kv_head_shift(h) for h in range(n_kv)], device=self.device)

    def stored(self, positions):
        if positions.shape[1] > 1:  # a prefill chunk: its queries reach every residue, so the whole span
            return self.ring_k, self.ring_v, self.ring_pos[:, None]
        # Decode: per KV head the W positions p - s - m * r (m < W) its offset s lets the query p see.
        steps = torch.arange(self.pattern.window, device=self.device) * self.pattern.dilation
        want = positions[:, :1, None] - self.shifts[None, :, None] - steps[None, None]  # (B, Hkv, W)
        slots = want.clamp(min=0) % self.span
        held = self.ring_pos[:, None, :].expand(-1, self.n_kv, -1).gather(2, slots)
        k_pos = torch.where((want >= 0) & (held == want), want, -1)
        index = slots[..., None].expand(-1, -1, -1, self.head_dim)
        return self.ring_k.gather(2, index), self.ring_v.gather(2, index), k_pos

    def write(self, k, v, positions):
        self._write_ring(k, v, positions)

    def nbytes(self):
        return {"device": self._ring_bytes(), "history": 0}


def layer_cache(pattern: Pattern, batch: int, n_kv: int, head_dim: int, dtype, device,
                history_device=None) -> LayerCache:
    if isinstance(pattern, SlidingPattern):
        return SlidingCache(pattern, batch, n_kv, head_dim, dtype, device, history_device)
    if isinstance(pattern, DilatedPattern):
        return DilatedCache(pattern, batch, n_kv, head_dim, dtype, device)
    return FullCache(pattern, batch, n_kv, head_dim, dtype, device)


class KVCache:
    """Every attention layer's cache for one batch of sequences, keyed by global layer index.

    ``begin(positions)`` gives the layers the positions (B, C) of the tokens of the next forward
    (-1 for padding); ``lengths`` (B,) are the tokens each sequence holds so far."""

    def __init__(self, model, batch: int, device, dtype, capacity: int = 0, history_device=None):
        """Caches for ``batch`` sequences, with room reserved for ``capacity`` tokens each (they grow
        past it). On the meta device nothing is allocated: ``nbytes`` is then the plan's size."""
        self.layers: dict[int, LayerCache] = {}
        for name, block in model.layers.items():
            attention = block.attention
            self.layers[int(name)] = layer_cache(attention.pattern, batch, attention.n_kv_heads, attention.head_dim,
                                                 dtype, device, history_device)
            self.layers[int(name)].reserve(capacity)
        self.lengths = torch.zeros(batch, dtype=torch.long)

    def begin(self, positions: torch.Tensor) -> None:
        for cache in self.layers.values():
            cache.positions = positions
        self.lengths = torch.maximum(self.lengths, (positions.max(dim=1).values + 1).cpu())

    def layer(self, index: int) -> LayerCache:
        return self.layers[index]

    def nbytes(self) -> dict[str, int]:
        """Bytes held by every layer: {"device": ..., "history": ...}, and per kind ("full", ...)."""
        total = {"device": 0, "history": 0}
        for cache in self.layers.values():
            held = cache.nbytes()
            total["device"] += held["device"]
            total["history"] += held["history"]
            total[cache.pattern.kind] = total.get(cache.pattern.kind, 0) + held["device"]
        return total

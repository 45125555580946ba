"""Context parallelism: every sample's sequence split over the CP ranks, attention exact per layer kind.

Split (zigzag, Megatron's): T is cut into 2N chunks of c = T / 2N; CP rank r holds chunks r and
2N - 1 - r, in that order (``zigzag_positions``). A causal full layer then gives every rank the
same work, and a local layer's work is even under any split (docs/decisions/0015-context-parallelism.md
has the measured imbalance). The data path (``shard_batch``) cuts each sample's tokens, labels,
loss mask and positions this way and keeps the whole sample's document ids, which the attention
rules need at every position.

What each layer kind receives (``--cp-comm-type p2p``, the default):

* full: the causal prefix. A rank receives, in one exchange, the K/V of every earlier position it
  lacks (under the zigzag split 3/4 of all-gather's rows on average, all of them on rank 0), and
  each of its chunks attends over its own causal prefix (no later key). A ring (N - 1 steps, partial
  attentions merged by log-sum-exp) moves all-gather's bytes; built over autograd it keeps every
  block for backward anyway, and on CPU its LSE needs the recomputing kernel, 1.7-1.9x the fused one
  (ADR 0015, table 4), so it is not used.
* sliding / dilated: a halo. Each chunk needs the keys within the pattern's reach before it
  (``Pattern.reach``: W, or W * r dilated), fetched from whichever ranks hold them (several
  when a chunk is shorter than the reach). Global tokens: the global keys before a rank's chunks are
  fetched too (T / G of them; with packed documents each document restarts the count, and a position
  that is global in any sample of the micro-batch is fetched); a global *query* sees every earlier
  key, so it is sent to the other ranks, which attend it over their own keys and send back
  (out, lse), merged by log-sum-exp.

``--cp-comm-type allgather`` gathers every rank's K/V for every layer (Megatron's all-gather
mode; the baseline the traffic benchmark compares with). Every exchange is one autograd function
(``_Exchange``) over point-to-point messages with a plan every rank derives alike, so backward
sends each gradient back where its rows came from. ``record_traffic`` counts the bytes sent.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.distributed as dist

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.model.attention.patterns import Documents, Pattern, SlidingPattern
from longctx_megatron.model.attention.positional import attend_at_positions
from longctx_megatron.model.attention.softmax import merge_by_lse
from longctx_megatron.model.loss import loss_weights
from longctx_megatron.parallel.state import ParallelContext

CP_COMM_TYPES = ("p2p", "allgather")
_REFUSED_COMM_TYPES = {
    "a2a": "all-to-all (Ulysses) needs the KV heads of a TP rank divisible by the CP size, and is not built here",
    "a2a+p2p": "hierarchical all-to-all + ring is not built here",
}
SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")  # what shard_batch cuts along the sequence


def check_comm_type(comm_type: str, cp_size: int) -> None:
    """A named error for a comm type that is not Megatron's, or (with CP > 1) one not built here."""
    if comm_type in _REFUSED_COMM_TYPES and cp_size > 1:
        raise ConfigError(f"--cp-comm-type {comm_type}: {_REFUSED_COMM_TYPES[comm_type]}; use one of {CP_COMM_TYPES}")
    if comm_type not in CP_COMM_TYPES and comm_type not in _REFUSED_COMM_TYPES:
        raise ConfigError(f"--cp-comm-type {comm_type!r} is not one of {CP_COMM_TYPES}")


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The sequence positions CP rank ``cp_rank`` holds, ascending: chunks r and 2N - 1 - r of 2N."""
    if seq_len % (2 * cp_size):
        raise ConfigError(f"sequence length {seq_len} is not divisible by 2 x context-parallel size ({2 * cp_size})")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk, device=device),
                      torch.arange(second, second + chunk, device=device)])


def shard_batch(batch: dict, ctx: ParallelContext) -> dict:
    """This CP rank's part of a micro-batch of whole samples: tokens, labels, loss mask and positions
    at its zigzag positions; ``document_ids`` stay whole (the rules need every position's document);
    ``loss_tokens`` is the whole micro-batch's token count, which its token mean divides by."""
    if ctx.cp_size == 1:
        return batch
    seq_len = batch["tokens"].shape[1]
    keep = zigzag_positions(seq_len, ctx.cp_size, ctx.cp_rank, batch["tokens"].device)
    out = dict(batch)
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(seq_len, device=keep.device).expand_as(batch["tokens"])
    for key in SEQUENCE_KEYS:
        if key in out:
            out[key] = out[key][:, keep]
    out["loss_tokens"] = loss_weights(batch["labels"], batch.get("loss_mask")).sum()
    return out


_recorders: list[Counter] = []


@contextlib.contextmanager
def record_traffic():
    """Count the bytes this rank sends in context-parallel exchanges, by (layer kind, message, direction):
    message "kv", "queries" or "answers" (see ``rows_sent``), direction "forward" or "backward"."""
    counter = Counter()
    _recorders.append(counter)
    try:
        yield counter
    finally:
        _recorders.remove(counter)


def _count(label: tuple[str, ...], nbytes: int) -> None:
    for counter in _recorders:
        counter[label] += nbytes


def _send_receive(sends: list[tuple[int, torch.Tensor]], receives: list[tuple[int, torch.Tensor]], group,
                  label: tuple[str, ...]) -> None:
    """Post every send and receive (global peer ranks), then wait for all."""
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer, group) for peer, tensor in sends]
    ops += [dist.P2POp(dist.irecv, tensor, peer, group) for peer, tensor in receives]
    _count(label, sum(tensor.numel() * tensor.element_size() for _, tensor in sends))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class _Exchange(torch.autograd.Function):
    """Rows (dim 2) of x to other ranks: ``sends`` [(peer, index of my rows)], ``receives``
    [(peer, row count)]; returns the received rows concatenated in ``receives`` order. Backward
    sends each received row's gradient back and adds the gradients of the rows I sent."""

    @staticmethod
    def forward(ctx, x, sends, receives, group, label):
        ctx.sends, ctx.receives, ctx.group, ctx.label, ctx.shape = sends, receives, group, label, x.shape
        shape = list(x.shape)
        buffers = []
        for _, count in receives:
            shape[2] = count
            buffers.append(x.new_empty(shape))
        _send_receive([(peer, x[:, :, index]) for peer, index in sends],
                      list(zip([peer for peer, _ in receives], buffers, strict=True)), group, (*label, "forward"))
        if not buffers:
            shape[2] = 0
            return x.new_empty(shape)
        return torch.cat(buffers, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grads = list(grad.contiguous().split([count for _, count in ctx.receives], dim=2)) if ctx.receives else []
        back = []
        for peer, index in ctx.sends:
            shape = list(ctx.shape)
            shape[2] = index.numel()
            back.append((peer, grad.new_empty(shape)))
        _send_receive([(peer, g) for (peer, _), g in zip(ctx.receives, grads, strict=True)], back, ctx.group,
                      (*ctx.label, "backward"))
        out = grad.new_zeros(ctx.shape)
        for (_, index), (_, g) in zip(ctx.sends, back, strict=True):
            out.index_add_(2, index, g)
        return out, None, None, None, None


class ContextParallelAttention(torch.nn.Module):
    """Core attention (q, k, v of this rank's zigzag part of each sample) computed exactly as one
    process would over the whole sequence. Replaces a CoreAttention (``apply_context_parallel``)."""

    def __init__(self, pattern: Pattern, ctx: ParallelContext, comm_type: str = "p2p", dropout: float = 0.0,
                 dropout_rng=contextlib.nullcontext):
        super().__init__()
        check_comm_type(comm_type, ctx.cp_size)
        self.pattern, self.comm_type, self.dropout, self.dropout_rng = pattern, comm_type, dropout, dropout_rng
        self.group, self.ranks, self.size, self.rank = ctx.cp_group, ctx.cp_ranks, ctx.cp_size, ctx.cp_rank

    def extra_repr(self) -> str:
        return f"{self.pattern}, context parallel {self.size} ({self.comm_type})"

    def forward(self, q, k, v, documents: Documents | None = None):
        seq_len = q.shape[2] * self.size
        if documents is not None and documents.ids.shape[1] != seq_len:
            raise ValueError(f"context parallelism needs the whole sample's document ids ({seq_len} positions), "
                             f"got {documents.ids.shape[1]}")
        mine = [zigzag_positions(seq_len, self.size, rank, q.device) for rank in range(self.size)]
        dropout_p = self.dropout if self.training else 0.0
        with self.dropout_rng():
            return self._attend(q, k, v, mine, documents, dropout_p)

    def _plan(self, needs: list[torch.Tensor], mine: list[torch.Tensor]):
        """``plan`` for this rank, with peers as global ranks."""
        sends, receives, positions = plan(needs, mine, self.rank)
        return ([(self.ranks[peer], index) for peer, index in sends],
                [(self.ranks[peer], count) for peer, count in receives], positions)

    def _with_received(self, k, v, needs, mine):
        """My keys and values together with the ones at the ``needs`` positions, sorted by position."""
        sends, receives, positions = self._plan(needs, mine)
        local = torch.cat([k, v], dim=1)
        keys = torch.cat([local, _Exchange.apply(local, sends, receives, self.group, (self.pattern.kind, "kv"))],
                         dim=2)
        positions = torch.cat([mine[self.rank], positions])
        order = torch.argsort(positions)
        keys = keys[:, :, order]
        return keys[:, :k.shape[1]], keys[:, k.shape[1]:], positions[order]

    def _attend(self, q, k, v, mine, documents, dropout_p):
        """Receive the keys this rank's queries can see (all of them under allgather), attend each
        chunk over them; with global tokens under p2p, the global queries are answered by every rank."""
        pattern, seq_len = self.pattern, q.shape[2] * self.size
        is_global = global_positions(pattern, documents, seq_len, q.device)
        exchange_globals = is_global is not None and self.comm_type == "p2p"
        # A full layer's reach is the whole sequence: its halo is every earlier position.
        needs = everything_else(mine) if self.comm_type == "allgather" else halo_needs(mine, pattern.reach or seq_len,
                                                                                       is_global)
        keys, values, positions = self._with_received(k, v, needs, mine)
        # Gathered whole, global queries are answered here: every key is, and no reach limits them.
        reach = pattern.reach if is_global is None or exchange_globals else None
        always = is_global[positions] if exchange_globals else None
        half = q.shape[2] // 2  # each chunk on its own: a block never spans the gap between them, and
        # the first chunk of a full layer scores its own causal prefix, not the second chunk's
        out = torch.cat([attend_at_positions(q[:, :, part], keys, values, pattern, mine[self.rank][part], positions,
                                             documents, reach, always, dropout_p, need_lse=False)[0]
                         for part in (slice(0, half), slice(half, None))], dim=2)
        if not exchange_globals:
            return out
        return self._global_queries(q, k, v, keys, out, mine, is_global, documents, dropout_p)

    def _global_queries(self, q, k, v, keys, out, mine, is_global, documents, dropout_p):
        """Global queries see every earlier key: each rank attends the others' global queries over its
        own keys and sends (out, lse) back; the owner merges them with its own part by log-sum-exp and
        writes the result over those rows."""
        here = mine[self.rank]
        rows = torch.nonzero(is_global[here]).flatten()  # my global queries, as local indices
        own, own_lse = attend_at_positions(q[:, :, rows], k, v, self.pattern, here[rows], here, documents,
                                           dropout_p=dropout_p)
        sends, receives, positions = self._plan(global_query_needs(mine, is_global), mine)
        # The exchanges of a layer are chained (_Tie) so that their backward passes, which talk to the
        # peers', run in one order on every rank: answers' lse, answers, queries, then the halo.
        queries = _Exchange.apply(_Tie.apply(q, keys), sends, receives, self.group, (self.pattern.kind, "queries"))
        answer, answer_lse = attend_at_positions(queries, k, v, self.pattern, positions, here, documents,
                                                 dropout_p=dropout_p)
        # The answers (out in the activations' dtype, then lse in float32) go back the way the queries came.
        back_sends, start = [], 0
        for peer, count in receives:
            back_sends.append((peer, torch.arange(start, start + count, device=q.device)))
            start += count
        back_receives = [(peer, index.numel()) for peer, index in sends]
        label = (self.pattern.kind, "answers")
        answers = _Exchange.apply(_Tie.apply(answer, queries), back_sends, back_receives, self.group, label)
        answers_lse = _Exchange.apply(_Tie.apply(answer_lse[..., None], answers), back_sends, back_receives,
                                      self.group, label)[..., 0]
        start = 0
        for _, index in sends:  # the rows I sent that peer, answered over its keys
            at = torch.searchsorted(rows, index)
            piece = slice(start, start + index.numel())
            start += index.numel()
            part = own.new_zeros(own.shape).index_copy(2, at, answers[:, :, piece])
            part_lse = torch.full_like(own_lse, float("-inf")).index_copy(2, at, answers_lse[:, :, piece])
            own, own_lse = merge_by_lse(own, own_lse, part, part_lse)
        # Every exchange takes part in the graph on every rank, even where its rows are empty: its
        # backward sends to and receives from peers, which wait for it.
        return _Tie.apply(out.index_copy(2, rows, own), answers_lse)


class _Tie(torch.autograd.Function):
    """``result`` unchanged, with ``others`` joined to the graph (zero gradient): every rank then runs
    their backward (point-to-point exchanges whose peers wait for it), and only after ``result``'s."""

    @staticmethod
    def forward(ctx, result, *others):
        ctx.shapes = [(o.shape, o.dtype, o.device) for o in others]
        return result.view_as(result)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes])


def global_positions(pattern: Pattern, documents: Documents | None, seq_len: int, device=None) -> torch.Tensor | None:
    """(T,) bool: the positions that are a global token in some sample; None without global tokens."""
    if not isinstance(pattern, SlidingPattern) or not pattern.global_every:
        return None
    if documents is None:
        return pattern.is_global(torch.arange(seq_len, device=device))
    return pattern.is_global(documents.positions).any(dim=0)


def halo_needs(mine: list[torch.Tensor], reach: int, is_global: torch.Tensor | None) -> list[torch.Tensor]:
    """The positions each rank (holding ``mine[rank]``: two contiguous chunks) needs from others for a
    local layer: the ``reach - 1`` before each chunk, and every earlier global token."""
    needs = []
    for positions in mine:
        chunk = positions.numel() // 2
        needed = [torch.arange(max(0, int(start) - reach + 1), int(start), device=positions.device)
                  for start in (positions[0], positions[chunk])]
        if is_global is not None:
            needed.append(torch.nonzero(is_global[:int(positions[-1])]).flatten())
        needed = torch.unique(torch.cat(needed))
        needs.append(needed[~torch.isin(needed, positions)])
    return needs


def global_query_needs(mine: list[torch.Tensor], is_global: torch.Tensor) -> list[torch.Tensor]:
    """The global queries each rank is sent to answer: the others' that are later than its first key."""
    queries_at = [positions[is_global[positions]] for positions in mine]
    return [torch.cat([at[at > mine[rank][0]] for other, at in enumerate(queries_at) if other != rank])
            for rank in range(len(mine))]


def everything_else(mine: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather's needs: every position the rank does not hold."""
    return [torch.cat([positions for rank, positions in enumerate(mine) if rank != me]) for me in range(len(mine))]


def plan(needs: list[torch.Tensor], mine: list[torch.Tensor], rank: int):
    """What CP rank ``rank`` sends so that every rank gets the rows at the positions it ``needs`` that
    ``rank`` holds: (sends [(CP rank, my row index)], receives [(CP rank, count)], the positions
    received, in order). Every rank derives every plan from the same positions, so plans match."""
    sends, receives, positions = [], [], []
    for other in range(len(mine)):
        if other == rank:
            continue
        wanted = needs[other][torch.isin(needs[other], mine[rank])]
        if wanted.numel():
            sends.append((other, torch.searchsorted(mine[rank], wanted)))
        mine_from = needs[rank][torch.isin(needs[rank], mine[other])]
        if mine_from.numel():
            receives.append((other, mine_from.numel()))
            positions.append(mine_from)
    return sends, receives, torch.cat(positions) if positions else mine[rank][:0]


def rows_sent(pattern: Pattern, seq_len: int, cp_size: int, comm_type: str = "p2p",
              documents: Documents | None = None) -> list[dict[str, int]]:
    """Per CP rank, the rows one forward of a layer with ``pattern`` sends, by message: "kv" (a row is
    one position's K and V), "queries" (one global query, all heads) and "answers" (one global
    query's out, all heads, and its lse). From the same plans the layer runs; nothing is sent."""
    mine = [zigzag_positions(seq_len, cp_size, rank) for rank in range(cp_size)]
    if comm_type == "allgather":
        return [{"kv": (cp_size - 1) * (seq_len // cp_size)} for _ in range(cp_size)]
    is_global = global_positions(pattern, documents, seq_len)
    halo = halo_needs(mine, pattern.reach or seq_len, is_global)
    out = [{"kv": sum(index.numel() for _, index in plan(halo, mine, rank)[0])} for rank in range(cp_size)]
    if is_global is not None:
        asked = global_query_needs(mine, is_global)
        for rank in range(cp_size):
            sends, receives, _ = plan(asked, mine, rank)
            out[rank]["queries"] = sum(index.numel() for _, index in sends)
            out[rank]["answers"] = sum(count for _, count in receives)
    return out


def apply_context_parallel(model: torch.nn.Module, ctx: ParallelContext, comm_type: str = "p2p") -> torch.nn.Module:
    """Replace every block's core attention with its context-parallel version (after tensor parallelism,
    which fixes each rank's heads; before recomputation, which then recomputes the exchanges too)."""
    if ctx.cp_size == 1:
        return model
    for block in model.layers:
        core = block.attention.core_attention
        block.attention.core_attention = ContextParallelAttention(core.pattern, ctx, comm_type, core.dropout,
                                                                  core.dropout_rng)
    return model

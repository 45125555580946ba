"""Megatron's tensor-parallel layers. Each holds its slice of a global weight, described by ``weight_shard``.

The ShardSpec lives on the module, not the parameter: ``to_empty`` (materialising a meta model)
replaces parameter objects and would drop attributes set on them.

* ColumnParallelLinear: output features split; input copied in (or all-gathered from sequence shards).
* RowParallelLinear: input features split; output all-reduced (or reduce-scattered to sequence shards).
* VocabParallelEmbedding: vocabulary rows split (padded to a multiple of TP x 128), masked lookup.
* VocabParallelHead: logits for this rank's vocabulary slice and the vocab-parallel loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.model.loss import reduce_token_losses
from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from longctx_megatron.parallel.state import ParallelContext


@dataclass(frozen=True)
class ShardSpec:
    """This rank's slice of a global parameter: chunk ``rank`` of ``size`` along ``dim``.

    ``global_shape`` is the model's (unpadded) shape; ``dim`` is zero-padded to ``padded`` first.
    With ``parts`` > 1 the dimension holds that many stacked matrices (SwiGLU's [gate; up]) and
    each is split on its own, so the rank's slice is [part0_r; part1_r; ...].
    """

    dim: int
    rank: int
    size: int
    global_shape: tuple[int, ...]
    padded: int
    parts: int = 1

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the global tensor ``full``."""
        missing = self.padded - full.shape[self.dim]
        if missing:
            pad_shape = list(full.shape)
            pad_shape[self.dim] = missing
            full = torch.cat([full, full.new_zeros(pad_shape)], dim=self.dim)
        parts = full.chunk(self.parts, dim=self.dim)
        return torch.cat([part.chunk(self.size, dim=self.dim)[self.rank] for part in parts], dim=self.dim)

    def regions(self) -> list[tuple[int, int, int]]:
        """Where this rank's slice sits in the global tensor, along ``dim``: (local start, global start,
        length) for each stacked part, padding excluded (a slice that is all padding has length 0)."""
        part, local = self.padded // self.parts, self.padded // self.parts // self.size
        bound = self.global_shape[self.dim]
        out = []
        for p in range(self.parts):
            start = p * part + self.rank * local
            out.append((p * local, start, max(0, min(local, bound - start))))
        return out


def _sharded_weight(module, global_shape, dim, ctx: ParallelContext, padded=None, device=None, parts=1) -> None:
    """Give ``module`` its ``weight`` slice and the ``weight_shard`` describing it."""
    padded = global_shape[dim] if padded is None else padded
    if padded % (ctx.tp_size * parts):
        raise ValueError(f"dimension {dim} of {tuple(global_shape)} does not split over {ctx.tp_size} ranks")
    local_shape = list(global_shape)
    local_shape[dim] = padded // ctx.tp_size
    module.weight = torch.nn.Parameter(torch.empty(local_shape, device=device))
    module.weight_shard = ShardSpec(dim, ctx.tp_rank, ctx.tp_size, tuple(global_shape), padded, parts)


class _SequenceParallelLinear(torch.autograd.Function):
    """linear(all-gather of x over the sequence, weight) that keeps only this rank's sequence shard of x
    for the backward pass and gathers it again there (Megatron's sequence-parallel linear): saving the
    gathered input would keep TP times more, the whole sequence, for every projection of every layer."""

    @staticmethod
    def forward(ctx, x, weight, group):
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return F.linear(mappings.all_gather(x, mappings.SEQUENCE_DIM, group), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = mappings.reduce_scatter(grad.matmul(weight), mappings.SEQUENCE_DIM, ctx.group)
        if ctx.needs_input_grad[1]:
            gathered = mappings.all_gather(x, mappings.SEQUENCE_DIM, ctx.group)
            grad_weight = grad.flatten(0, -2).t().matmul(gathered.flatten(0, -2))
        return grad_x, grad_weight, None


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """The input of a column-parallel projection: copied in (its gradient all-reduced), or under
    sequence parallelism all-gathered from the sequence shards (``_SequenceParallelLinear``)."""
    if sequence_parallel and not mappings.is_single(group):
        return _SequenceParallelLinear.apply(x, weight, group)
    return F.linear(mappings.copy_to_tensor_model_parallel_region(x, group), weight)


class ColumnParallelLinear(torch.nn.Module):
    """The output stays split (the next layer is row-parallel, or the vocab-parallel loss reads it).
    ``padded_out_features`` zero-pads the output dimension first (a vocabulary-sized output);
    ``parts`` > 1 splits each of that many stacked output blocks separately (fused [gate; up])."""

    def __init__(self, in_features, out_features, ctx: ParallelContext, sequence_parallel=False,
                 padded_out_features=None, parts=1, device=None):
        super().__init__()
        self.group, self.sequence_parallel = ctx.tp_group, sequence_parallel
        _sharded_weight(self, (out_features, in_features), 0, ctx, padded_out_features, device, parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.group, self.sequence_parallel)


class RowParallelLinear(torch.nn.Module):
    """The input is already split (a column-parallel layer's output)."""

    def __init__(self, in_features, out_features, ctx: ParallelContext, sequence_parallel=False, device=None):
        super().__init__()
        self.group, self.sequence_parallel = ctx.tp_group, sequence_parallel
        _sharded_weight(self, (out_features, in_features), 1, ctx, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(y, self.group)
        return mappings.reduce_from_tensor_model_parallel_region(y, self.group)


class VocabParallelEmbedding(torch.nn.Module):
    def __init__(self, vocab_size, dim, ctx: ParallelContext, sequence_parallel=False, device=None):
        super().__init__()
        self.group, self.sequence_parallel = ctx.tp_group, sequence_parallel
        padded = padded_vocab_size(vocab_size, ctx.tp_size)
        _sharded_weight(self, (vocab_size, dim), 0, ctx, padded=padded, device=device)
        self.vocab_start = ctx.tp_rank * (padded // ctx.tp_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(elsewhere, 0), self.weight).masked_fill(elsewhere[..., None], 0.0)
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(out, self.group)
        return mappings.reduce_from_tensor_model_parallel_region(out, self.group)


class VocabParallelHead(torch.nn.Module):
    """Drop-in for LanguageModelHead: ``weight`` is this rank's vocabulary slice (tied or not)."""

    def __init__(self, vocab_size: int, ctx: ParallelContext, sequence_parallel=False):
        super().__init__()
        self.vocab_size, self.group, self.sequence_parallel = vocab_size, ctx.tp_group, sequence_parallel
        self.tp_rank = ctx.tp_rank

    def forward(self, hidden, weight, labels=None, loss_mask=None, loss_reduction="mean"):
        logits = column_parallel_linear(hidden, weight, self.group, self.sequence_parallel)
        if labels is None:
            return logits, None
        vocab_start = self.tp_rank * weight.shape[0]
        losses = vocab_parallel_cross_entropy(logits, labels, self.group, vocab_start, self.vocab_size)
        return logits, reduce_token_losses(losses, labels, loss_mask, loss_reduction)

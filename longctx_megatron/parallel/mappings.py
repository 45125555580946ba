"""Autograd-aware collectives between tensor-parallel regions (Megatron's mappings).

Activations are batch-first (B, T, d): tensor parallelism splits the last dimension, sequence
parallelism dimension 1. Every collective goes through ``all_reduce``, ``all_gather`` or
``reduce_scatter`` below, so tests can count calls and bytes by wrapping those three.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return dist.get_world_size(group)


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order."""
    world = _size(group)
    # Collectives take rank-major buffers concatenated along dim 0.
    parts = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(parts, x.contiguous(), group=group)
    return torch.cat(parts.chunk(world), dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} ranks")
    chunks = x.chunk(world, dim=dim)
    out = torch.empty_like(chunks[0], memory_format=torch.contiguous_format)
    _reduce_scatter_single(out, torch.cat(chunks, dim=0), group=group)
    return out


def split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (no communication)."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return split(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, SEQUENCE_DIM, ctx.group), None


def _single(group) -> bool:
    return group is None or _size(group) == 1


def copy_to_tensor_parallel_region(x, group):
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    return x if _single(group) else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group):
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if _single(group) else _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x, group):
    """Keep this rank's slice of the last dimension; backward all-gathers."""
    return x if _single(group) else _ScatterToRegion.apply(x, -1, group)


def gather_from_tensor_parallel_region(x, group):
    """All-gather along the last dimension; backward keeps this rank's slice."""
    return x if _single(group) else _GatherFromRegion.apply(x, -1, group)


def scatter_to_sequence_parallel_region(x, group):
    """Keep this rank's sequence chunk; backward all-gathers."""
    return x if _single(group) else _ScatterToRegion.apply(x, SEQUENCE_DIM, group)


def gather_from_sequence_parallel_region(x, group):
    """All-gather the sequence forward; reduce-scatter the gradient backward."""
    return x if _single(group) else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x, group):
    """Reduce-scatter along the sequence forward; all-gather the gradient backward."""
    return x if _single(group) else _ReduceScatterToSequence.apply(x, group)

"""Autograd-aware collectives between tensor-parallel regions, under megatron-core's names
(``megatron/core/tensor_parallel/mappings.py``), so the two can be read side by side.

Activations are batch-first (B, T, d): tensor parallelism splits the last dimension, sequence
parallelism dimension 1. Every collective goes through ``all_reduce``, ``all_gather`` or
``reduce_scatter`` below, so tests can count calls and bytes by wrapping those three.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

SEQUENCE_DIM = 1

# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
# (Module attributes, looked up at call time, so tests and benchmarks can wrap them to count traffic.)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    all_gather_single(parts, x.contiguous(), group=group)
    if _leading_ones(x, dim):  # rank-major is already the concatenation (one sample): no second copy
        return parts.view(*x.shape[:dim], world * x.shape[dim], *x.shape[dim + 1:])
    return torch.cat(parts.chunk(world), dim=dim)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} ranks")
    chunks = x.chunk(world, dim=dim)
    out = torch.empty_like(chunks[0], memory_format=torch.contiguous_format)
    if _leading_ones(x, dim):  # the chunks already lie rank-major (one sample): no copy to make them so
        stacked = x.contiguous().view(world * chunks[0].shape[0], *chunks[0].shape[1:])
    else:
        stacked = torch.cat(chunks, dim=0)
    reduce_scatter_single(out, stacked, group=group)
    return out


def _leading_ones(x: torch.Tensor, dim: int) -> bool:
    """Whether every dimension of ``x`` before ``dim`` has size 1, so that chunks along ``dim`` of a
    contiguous tensor are contiguous blocks in order (a micro-batch of one sample at long context)."""
    return all(size == 1 for size in x.shape[:dim % x.dim()])


class _Collective(torch.autograd.Function):
    """``forward(x)`` in the forward pass and ``backward(grad)`` in the backward pass: the two halves
    of each mapping below are collectives that are each other's adjoint."""

    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward = backward
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward(grad), None, None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def is_single(group) -> bool:
    return group is None or _size(group) == 1


def copy_to_tensor_model_parallel_region(x, group):
    """Identity forward; all-reduce of the gradient (input of a column-parallel layer)."""
    if is_single(group):
        return x
    return _Collective.apply(x, _identity, functools.partial(all_reduce, group=group))


def reduce_from_tensor_model_parallel_region(x, group):
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    if is_single(group):
        return x
    return _Collective.apply(x, functools.partial(all_reduce, group=group), _identity)


def reduce_scatter_to_sequence_parallel_region(x, group):
    """Reduce-scatter along the sequence forward; all-gather the gradient backward."""
    if is_single(group):
        return x
    return _Collective.apply(x, functools.partial(reduce_scatter, dim=SEQUENCE_DIM, group=group),
                             functools.partial(all_gather, dim=SEQUENCE_DIM, group=group))

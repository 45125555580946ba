"""Gradient norm and clipping over a tensor- and pipeline-parallel model, each parameter counted once.

Sharded parameters contribute their local squares summed over the TP group; parameters replicated
on every TP rank (norm weights) contribute once; stages add up over the pipeline group, the last
stage's copy of the tied embedding excluded. Every rank gets the same norm, so clipping keeps
shards and stages consistent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import tensor_parallel_shards


def grad_norm(models, ctx: ParallelContext | None) -> torch.Tensor:
    """The L2 norm of the global gradient (float32 scalar) of a model or this rank's model chunks."""
    models = models if isinstance(models, list | tuple) else [models]
    device = next(models[0].parameters()).device
    sharded = torch.zeros((), device=device)
    replicated = torch.zeros((), device=device)
    for model in models:
        shards = tensor_parallel_shards(model)
        pipeline_copy = getattr(model, "pre_process", True) is False  # this chunk's embedding is the tied copy
        for name, param in model.named_parameters():
            if param.grad is None or (pipeline_copy and name == "embedding.weight"):
                continue
            square = param.grad.detach().float().pow(2).sum()
            if name in shards:
                sharded += square
            else:
                replicated += square
    if ctx is not None and ctx.tp_size > 1:
        dist.all_reduce(sharded, group=ctx.tp_group)
    total = sharded + replicated
    if ctx is not None and ctx.pp_size > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    return total.sqrt()


def clip_grad_norm(models, max_norm: float, ctx: ParallelContext | None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    norm = grad_norm(models, ctx)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for model in models if isinstance(models, list | tuple) else [models]:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype))
    return norm

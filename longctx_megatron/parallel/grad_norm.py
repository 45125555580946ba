"""Gradient norm and clipping over a tensor- and pipeline-parallel model, each parameter counted once.

Each rank weights its parameters' squared gradients (``norm_weights``) so that the sum over the
TP and PP groups counts every element once; the distributed optimizer uses the same weights on its
shards and also sums over DP. Every rank gets the same norm, so clipping keeps shards and stages
consistent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import tensor_parallel_shards


def norm_weights(models, ctx: ParallelContext | None) -> dict[torch.nn.Parameter, float]:
    """How much each parameter's squared gradient counts on this rank so that summing over TP and PP
    ranks counts every element once: 1 for a TP shard, 1/tp for a copy replicated over the TP
    group (norm weights), 0 for a duplicate (the last stage's copy of the tied embedding)."""
    tp = ctx.tp_size if ctx is not None else 1
    weights = {}
    for model in models if isinstance(models, list | tuple) else [models]:
        shards = tensor_parallel_shards(model)
        for name, param in model.named_parameters():
            duplicate = model.is_embedding_copy(name) if hasattr(model, "is_embedding_copy") else False
            weights[param] = 0.0 if duplicate else 1.0 if name in shards else 1.0 / tp
    return weights


def reduce_over_groups(total: torch.Tensor, ctx: ParallelContext | None, groups=("tp", "pp")) -> torch.Tensor:
    """Sum a rank's weighted total (in place) over the given parallel groups ("tp", "pp", "dp_cp"); returns it."""
    for kind in groups if ctx is not None else ():
        if getattr(ctx, f"{kind}_size") > 1:
            dist.all_reduce(total, group=getattr(ctx, f"{kind}_group"))
    return total


def reduce_norm_squares(total: torch.Tensor, ctx: ParallelContext | None, groups=("tp", "pp")) -> torch.Tensor:
    """Sum a rank's weighted squared-gradient total over the given parallel groups; returns the norm."""
    return reduce_over_groups(total, ctx, groups).sqrt()


def grad_norm(models, ctx: ParallelContext | None) -> torch.Tensor:
    """The L2 norm of the global gradient (float32 scalar) of a model or this rank's model chunks."""
    weights = norm_weights(models, ctx)
    device = next(iter(weights)).device
    total = torch.zeros((), device=device)
    for param, weight in weights.items():
        if param.grad is None and param.dtype != torch.float32 and hasattr(param, "main_grad"):
            raise TypeError("grad_norm reads param.grad, which a bf16/fp16 parameter does not have: its fp32 "
                            "gradient is main_grad, read by DistributedOptimizer.grad_norm()")
        if param.grad is not None and weight:
            total += param.grad.detach().float().pow(2).sum() * weight
    return reduce_norm_squares(total, ctx)


def clip_by_norm(models, max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients by max_norm / norm when the global ``norm`` exceeds ``max_norm`` (0: no
    clipping, as Megatron's ``--clip-grad 0``)."""
    if not max_norm:
        return
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for model in models if isinstance(models, list | tuple) else [models]:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale.to(param.grad.dtype))


def clip_grad_norm(models, max_norm: float, ctx: ParallelContext | None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (0: no clipping); returns the norm
    before clipping."""
    norm = grad_norm(models, ctx)
    clip_by_norm(models, max_norm, norm)
    return norm

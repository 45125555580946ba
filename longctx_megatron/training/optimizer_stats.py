"""--log-params-norm and --log-num-zeros-in-grad: the parameters' global L2 norm and the number of
zeros in the gradients, each element of the model counted once over TP, PP and DP.

Both follow the gradient norm's one rule (parallel/grad_norm.norm_weights): on each rank a
parameter counts with weight 1 when it is a TP shard, 1/tp when the TP group holds copies of it,
and 0 for the last stage's copy of the tied embedding; the weighted totals are summed over the TP
and PP groups. Under the distributed optimizer (ZeRO-1) each DP rank holds a shard of every bucket,
so its totals cover that shard alone (the shard's weights, padding 0) and are summed over DP x CP
as well, and the norm is that of the float32 master weights, as Megatron's calc_params_l2_norm reads
the main parameters; otherwise the parameters themselves (float32) and their ``main_grad``. The
vocabulary's TP padding rows (zero weights, zero gradients) are not the model's: they add nothing to
the norm and are left out of the zero count, so both equal a one-process run's.

Every rank calls these at the same iteration (they are collectives) and gets the same value.
"""

from __future__ import annotations

import torch

from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer
from longctx_megatron.parallel.grad_norm import norm_weights, reduce_over_groups
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import tensor_parallel_shards

_SHARDED = ("dp_cp", "tp", "pp")


def params_norm(optimizer, chunks: list, ctx: ParallelContext) -> float:
    """The L2 norm of all the model's parameters (after the latest update), as Megatron's params-norm."""
    if isinstance(optimizer, DistributedOptimizer):
        total = torch.zeros((), dtype=torch.float64, device=optimizer.masters[0].device)
        for master, weights in zip(optimizer.masters, optimizer.norm_weights, strict=True):
            total += (master.detach().double() ** 2 * weights).sum()
        return reduce_over_groups(total, ctx, _SHARDED).sqrt().item()
    weights = norm_weights(chunks, ctx)
    total = torch.zeros((), dtype=torch.float64, device=next(iter(weights)).device)
    for param, weight in weights.items():
        if weight:
            total += param.detach().double().pow(2).sum() * weight
    return reduce_over_groups(total, ctx).sqrt().item()


def _model_elements(chunks: list) -> dict[torch.nn.Parameter, torch.Tensor | None]:
    """For each parameter, a mask of the elements that are the model's (None: all of them): a
    vocabulary-parallel weight's rows beyond the vocabulary are TP padding (parallel/layers.ShardSpec),
    which the one-process model does not have."""
    masks = {}
    for chunk in chunks:
        shards = tensor_parallel_shards(chunk)
        for name, param in chunk.named_parameters():
            spec = shards.get(name)
            if spec is None or spec.padded == spec.global_shape[spec.dim]:
                masks[param] = None
                continue
            mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            for local, _, length in spec.regions():
                mask.narrow(spec.dim, local, length).fill_(True)
            masks[param] = mask.flatten()
    return masks


def _gradient_pieces(optimizer, chunks: list):
    """(parameter, this rank's flat piece of its gradient, where the piece starts in the flattened parameter):
    the whole ``main_grad`` of every parameter, or under the distributed optimizer the part of each that
    falls in this DP rank's shard of its bucket."""
    if not isinstance(optimizer, DistributedOptimizer):
        for chunk in chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is None:
                    grad = param.grad
                if grad is not None:
                    yield param, grad.flatten(), 0
        return
    grads = optimizer.grads
    for bucket in grads.buckets:
        shard = grads.shard(bucket)
        for param, begin, end, at in bucket.shard_pieces(grads.ctx.dp_cp_rank):
            yield param, shard[at:at + end - begin], begin


def num_zeros_in_grad(optimizer, chunks: list, ctx: ParallelContext) -> int:
    """How many elements of the model's global gradient (reduced over DP, before clipping) are exactly 0.
    TP padding rows of the vocabulary are not counted (Megatron, whose vocabulary padding is part of its
    model, counts them), so the count is the same under any layout."""
    weights, masks = norm_weights(chunks, ctx), _model_elements(chunks)
    total = torch.zeros((), dtype=torch.float64, device=next(iter(weights)).device)
    for param, piece, offset in _gradient_pieces(optimizer, chunks):
        if not weights[param]:
            continue
        zeros = piece == 0
        if masks[param] is not None:
            zeros &= masks[param][offset:offset + piece.numel()]
        total += zeros.sum().double() * weights[param]
    groups = _SHARDED if isinstance(optimizer, DistributedOptimizer) else ("tp", "pp")
    return round(reduce_over_groups(total, ctx, groups).item())

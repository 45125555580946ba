"""The optimizer of a run, with one interface whether its state is sharded over DP or not.

Both ``LocalOptimizer`` (torch AdamW, or apex FusedAdam on CUDA, over the parameters' fp32
gradients) and ``DistributedOptimizer`` (ZeRO-1, fp32 masters; always used for bf16/fp16 weights)
offer ``grad_norm()`` (the global norm over TP, PP and DP), ``step(clip, norm)`` (clip by the global
norm, update; 0 disables clipping), ``steps`` (updates applied, for checkpoints) and ``param_groups``
(where the schedule sets the learning rate; groups marked ``"decoupled"`` hold the embedding and
output weights, which --decoupled-lr schedules apart).
Which parameters get weight decay is ``applies_weight_decay``, for both.
"""

from __future__ import annotations

import torch

from longctx_megatron.parallel.data_parallel import DataParallelGradients, is_embedding_or_output
from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer, applies_weight_decay
from longctx_megatron.parallel.grad_norm import clip_by_norm, grad_norm, norm_weights
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.training.run_config import RunConfig

try:
    from apex.optimizers import FusedAdam
except ImportError:
    FusedAdam = None


class LocalOptimizer:
    """A torch optimizer over this rank's float32 parameters, whose gradients are the fp32 buckets."""

    def __init__(self, chunks: list, ctx: ParallelContext, optimizer: torch.optim.Optimizer):
        self.chunks, self.ctx, self.optimizer = chunks, ctx, optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def steps(self) -> int:
        """How many updates have been applied (skipped iterations excluded)."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return int(self.optimizer.param_groups[0].get("step", 0))  # apex FusedAdam keeps it per group

    def grad_norm(self) -> torch.Tensor:
        return grad_norm(self.chunks, self.ctx)

    def step(self, clip: float, norm: torch.Tensor | None = None) -> torch.Tensor:
        norm = self.grad_norm() if norm is None else norm
        clip_by_norm(self.chunks, clip, norm)
        self.optimizer.step()
        return norm


def build_optimizer(run: RunConfig, chunks: list, grads: DataParallelGradients, ctx: ParallelContext,
                    device: torch.device) -> LocalOptimizer | DistributedOptimizer:
    """ZeRO-1 with --use-distributed-optimizer or 16-bit weights (whose fp32 masters it keeps), else local."""
    training = run.training
    betas = (training.adam_beta1, training.adam_beta2)
    decoupled = {p for chunk in chunks for name, p in chunk.named_parameters() if is_embedding_or_output(name)}
    if run.parallel.distributed_optimizer or training.dtype != torch.float32:
        return DistributedOptimizer(grads, norm_weights(chunks, ctx), lr=training.lr, betas=betas,
                                    eps=training.adam_eps, weight_decay=training.weight_decay, decoupled=decoupled)
    params = [p for chunk in chunks for p in chunk.parameters()]
    groups = [{"params": [p for p in params if applies_weight_decay(p) == decays and (p in decoupled) == apart],
               "weight_decay": training.weight_decay if decays else 0.0, "decoupled": apart}
              for decays in (True, False) for apart in (False, True)]
    groups = [group for group in groups if group["params"]]
    if FusedAdam is not None and device.type == "cuda":
        inner = FusedAdam(groups, lr=training.lr, betas=betas, eps=training.adam_eps, adam_w_mode=True)
    else:
        inner = torch.optim.AdamW(groups, lr=training.lr, betas=betas, eps=training.adam_eps,
                                  fused=device.type == "cuda")
    return LocalOptimizer(chunks, ctx, inner)

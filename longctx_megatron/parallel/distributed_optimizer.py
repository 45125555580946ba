"""The distributed optimizer (ZeRO stage 1, ``--use-distributed-optimizer``): AdamW partitioned over DP.

The gradient buckets of DataParallelGradients are reduce-scattered, so a DP rank holds the summed
gradient of its 1/dp shard of every bucket only; it keeps float32 master weights and AdamW's state
for that shard alone, updates them, and the updated shards are all-gathered back into the
parameters. Which values a rank holds is the buckets' one rule (``shard_range``, ``param_ranges``);
a checkpoint gets and sets the state parameter by parameter (``shards``, ``load_state``,
``steps``), in model space, so it never needs to know the buckets.
"""

from __future__ import annotations

import torch

from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.grad_norm import reduce_norm_squares

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per value, by torch's names


def applies_weight_decay(param: torch.nn.Parameter) -> bool:
    """Whether weight decay applies to ``param``: to matrices, not to norm weights (as in Megatron)."""
    return param.dim() > 1


def _shard_of(bucket, dp_rank: int, values) -> torch.Tensor:
    """A copy of DP rank ``dp_rank``'s shard of the bucket-shaped flat float32 tensor that holds
    ``values(param)`` (flattened, or a scalar for all of it) for each of ``bucket``'s parameters (padding 0)."""
    flat = torch.zeros(bucket.padded, dtype=torch.float32, device=bucket.buffer.device)
    for param, start, stop in bucket.param_ranges():
        flat[start:stop] = values(param)
    return bucket.shard(flat, dp_rank).clone()


class DistributedOptimizer:
    """AdamW whose state and float32 master weights cover only this DP rank's shard of each bucket.

    ``norm_weights`` maps each parameter to how much its squared gradient counts in the global
    norm on this rank (grad_norm.norm_weights). ``decay(param)`` says whether weight decay applies.
    The masters of buckets whose parameters are all in ``decoupled`` form a second parameter group,
    marked ``"decoupled": True``, whose learning rate the schedule sets apart (--decoupled-lr).
    """

    def __init__(self, grads: DataParallelGradients, norm_weights: dict, lr: float, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, decay=applies_weight_decay, decoupled=frozenset()):
        self.grads, self.ctx, self.weight_decay = grads, grads.ctx, weight_decay
        self.masters, self.decay_masks, self.norm_weights = [], [], []
        rank = self.ctx.dp_cp_rank
        for bucket in grads.buckets:
            self.masters.append(torch.nn.Parameter(_shard_of(bucket, rank, lambda p: p.detach().float().flatten())))
            self.decay_masks.append(_shard_of(bucket, rank, lambda p: float(decay(p))))
            self.norm_weights.append(_shard_of(bucket, rank, lambda p: norm_weights[p]))
        apart = [all(p in decoupled for p in bucket.params) for bucket in grads.buckets]
        groups = [{"params": [m for m, alone in zip(self.masters, apart, strict=True) if alone == flag],
                   "decoupled": flag} for flag in (False, True)]
        # fused on CUDA: the foreach kernels would allocate temporaries the size of the whole shard
        self.optimizer = torch.optim.AdamW([group for group in groups if group["params"]], lr=lr, betas=betas,
                                           eps=eps, weight_decay=0.0, fused=self.masters[0].is_cuda)
        self._lr_group = {id(m): group for group in self.optimizer.param_groups for m in group["params"]}

    @property
    def param_groups(self):
        return self.optimizer.param_groups  # learning-rate schedulers set "lr" here

    @property
    def steps(self) -> int:
        """How many updates have been applied (skipped iterations excluded)."""
        for state in self.optimizer.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm from the reduced shards, summed over DP, TP and PP ranks."""
        total = torch.zeros((), dtype=torch.float32, device=self.masters[0].device)
        for bucket, weights in zip(self.grads.buckets, self.norm_weights, strict=True):
            total += (self.grads.shard(bucket) ** 2 * weights).sum()
        return reduce_norm_squares(total, self.ctx, groups=("dp_cp", "tp", "pp"))

    def step(self, clip: float | None = None, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Clip by the global norm (``norm`` if already computed), update this rank's shards, all-gather
        the parameters; returns the norm."""
        norm = self.grad_norm() if norm is None else norm
        scale = (clip / (norm + 1e-6)).clamp(max=1.0) if clip else torch.ones(())
        for bucket, master, mask in zip(self.grads.buckets, self.masters, self.decay_masks, strict=True):
            master.grad = self.grads.shard(bucket) * scale
            lr = self._lr_group[id(master)]["lr"]
            with torch.no_grad():
                master.mul_(1.0 - lr * self.weight_decay * mask)  # decoupled decay, as AdamW applies it
        self.optimizer.step()
        with torch.no_grad():
            for bucket, master in zip(self.grads.buckets, self.masters, strict=True):
                gathered = torch.empty(bucket.padded, dtype=torch.float32, device=master.device)
                if self.ctx.dp_cp_size > 1:
                    mappings.all_gather_single(gathered, master.detach(), group=self.ctx.dp_cp_group)
                else:
                    gathered.copy_(master.detach())
                for param, start, stop in bucket.param_ranges():
                    param.copy_(gathered[start:stop].view_as(param))
        return norm

    def shards(self):
        """(parameter, start, stop, master, moments) for every parameter this DP rank holds values of:
        values [start, stop) of the flattened parameter, as views of this rank's float32 master weights
        and of AdamW's moments ({MOMENTS name: view}; empty before the first step). Nothing is
        communicated."""
        for bucket, master in zip(self.grads.buckets, self.masters, strict=True):
            state = self.optimizer.state.get(master, {})
            flats = {kind: state[kind] for kind in MOMENTS if kind in state}
            for param, begin, end, at in bucket.shard_pieces(self.ctx.dp_cp_rank):
                piece = slice(at, at + end - begin)
                yield param, begin, end, master.detach()[piece], {kind: flat[piece] for kind, flat in flats.items()}

    def load_state(self, masters, moments, steps: int) -> None:
        """Set this rank's shards from model-space values (whole parameters, in their shape): the float32
        masters from ``masters(param)``, always (they must follow the loaded weights); when ``steps`` > 0,
        AdamW's moments from ``moments(param, kind)`` (kind in MOMENTS) and its step count."""
        rank = self.ctx.dp_cp_rank
        with torch.no_grad():
            for bucket, master in zip(self.grads.buckets, self.masters, strict=True):
                master.copy_(_shard_of(bucket, rank, lambda p: masters(p).float().flatten()))
                if steps:
                    state = {kind: _shard_of(bucket, rank, lambda p, k=kind: moments(p, k).float().flatten())
                             for kind in MOMENTS}
                    self.optimizer.state[master] = {"step": torch.tensor(float(steps)),
                                                    **{k: v.to(master.device) for k, v in state.items()}}

"""Data parallelism: bucketed gradient reduction overlapped with backward, and a ZeRO-1 optimizer.

Every parameter gets a float32 ``main_grad``, a view into a contiguous bucket buffer, into which
each micro-batch's gradient is accumulated by a post-accumulate-grad hook (so gradients add up in
fp32 whatever the parameter dtype). Buckets fill in backward order; as soon as a bucket has seen
the last micro-batch's gradient of all its parameters its reduction starts asynchronously while
backward continues on earlier layers.

``DataParallelGradients`` is the one owner of "the gradient of a parameter": ``main_grad`` is what
every optimizer reads (for float32 parameters ``param.grad`` is the same memory; for bf16/fp16
parameters there is no other gradient), and every reduction acts on it. The reductions run over the
data x context parallel ranks (``ctx.dp_cp_group``: context-parallel ranks hold the same weights and
different parts of each sample, so their gradients add up). ``finish()`` waits for the
reductions, divides by the step's divisor (DP size, loss scale, or the global token count) and
sums the gradients of the parameters that other ranks hold as copies fed different data: the tied
embedding's first- and last-stage copies, and norms replicated over TP under sequence parallelism.

With the distributed optimizer (``--use-distributed-optimizer``, parallel/distributed_optimizer.py)
each bucket is reduce-scattered instead: a DP rank receives only the summed gradient of its 1/dp
shard of every bucket (``_Bucket.shard_range`` says which values).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.replicas import sequence_parallel_replicas, tied_embedding_weights
from longctx_megatron.parallel.state import ParallelContext


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter], dp_size: int, device):
        self.params, self.dp_size = params, dp_size
        numel = sum(p.numel() for p in params)
        self.padded = -(-numel // dp_size) * dp_size  # reduce-scatter needs equal shards
        self.buffer = torch.zeros(self.padded, dtype=torch.float32, device=device)
        self.views = {param: self.buffer[start:stop].view_as(param) for param, start, stop in self.param_ranges()}
        self.expected = 0
        self.seen = 0
        self.work = None

    def shard_range(self, dp_rank: int) -> tuple[int, int]:
        """[start, stop) of DP rank ``dp_rank``'s shard in the flat buffer: the one shard rule (equal
        contiguous shards in DP rank order, as reduce-scatter and all-gather cut them)."""
        size = self.padded // self.dp_size
        return dp_rank * size, (dp_rank + 1) * size

    def shard(self, flat: torch.Tensor, dp_rank: int) -> torch.Tensor:
        """DP rank ``dp_rank``'s part (a view) of a bucket-shaped flat tensor."""
        start, stop = self.shard_range(dp_rank)
        return flat[start:stop]

    def shard_pieces(self, dp_rank: int):
        """(parameter, begin, end, at) for each parameter with values in DP rank ``dp_rank``'s shard: values
        [begin, end) of the flattened parameter, which start at offset ``at`` of the rank's shard."""
        first, last = self.shard_range(dp_rank)
        for param, start, stop in self.param_ranges():
            low, high = max(start, first), min(stop, last)
            if low < high:
                yield param, low - start, high - start, low - first

    def param_ranges(self):
        """(parameter, start, stop) of each parameter's values in the flat buffer, in order."""
        offset = 0
        for param in self.params:
            yield param, offset, offset + param.numel()
            offset += param.numel()


def summed_replicas(models: list[torch.nn.Module], ctx: ParallelContext
                    ) -> list[tuple[list[torch.nn.Parameter], dist.ProcessGroup]]:
    """(parameters, group) for each set of parameters held as copies on the ranks of ``group``
    that see different data, so that their gradients must be summed over it (beyond DP)."""
    out = []
    tied = tied_embedding_weights(models, ctx)
    if tied:
        out.append((tied, ctx.embedding_group))
    if ctx.tp_size > 1:
        replicas = [param for model in models for param in sequence_parallel_replicas(model)]
        if replicas:
            out.append((replicas, ctx.tp_group))
    return out


def is_embedding_or_output(name: str) -> bool:
    """Whether parameter ``name`` is the input embedding or the output layer (Megatron's decoupled-lr set)."""
    return name in ("embedding.weight", "output.weight")


class DataParallelGradients:
    """Accumulates micro-batch gradients in fp32 buckets, reduces them over the DP x CP group and sums
    the replicas of ``summed_replicas``: the gradient every optimizer reads (``param.main_grad``)."""

    def __init__(self, models: list[torch.nn.Module], ctx: ParallelContext, bucket_mb: float = 25.0,
                 distributed_optimizer: bool = False):
        self.ctx, self.distributed_optimizer = ctx, distributed_optimizer
        params = [p for model in models for p in model.parameters() if p.requires_grad]
        device = params[0].device
        limit = max(1, int(bucket_mb * 2**20 / 4))
        # The tied embedding's first- and last-stage copies get a bucket each of their own, so both
        # have the same offsets and the same DP shard: summing the copies' gradients after a
        # reduce-scatter (finish() sums the copies) then adds matching rows.
        # The embedding and output weights get a bucket each as well, so that an optimizer can give
        # them a learning rate of their own (--decoupled-lr) bucket by bucket.
        tied = set(tied_embedding_weights(models, ctx))
        alone = tied | {p for model in models for name, p in model.named_parameters() if is_embedding_or_output(name)}
        self.buckets = [_Bucket([param], ctx.dp_cp_size, device) for param in reversed(params) if param in alone]
        current, size = [], 0
        for param in reversed(params):  # roughly the order backward produces gradients
            if param in alone:
                continue
            current.append(param)
            size += param.numel()
            if size >= limit:
                self.buckets.append(_Bucket(current, ctx.dp_cp_size, device))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current, ctx.dp_cp_size, device))
        self._bucket_of = {param: bucket for bucket in self.buckets for param in bucket.params}
        for param in params:
            param.main_grad = self._bucket_of[param].views[param]  # float32, read by the optimizers
            param.register_post_accumulate_grad_hook(self._accumulate)
        self.replicas = summed_replicas(models, ctx)

    def start(self, microbatches: int) -> None:
        """Prepare for a step of ``microbatches`` backward passes per parameter."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.expected, bucket.seen, bucket.work = len(bucket.params) * microbatches, 0, None
            for param in bucket.params:
                param.grad = None  # autograd would otherwise add into the previous step's gradient

    def _accumulate(self, param: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        bucket.views[param].add_(param.grad)
        param.grad = None
        bucket.seen += 1
        if bucket.seen == bucket.expected and self.ctx.dp_cp_size > 1:
            if self.distributed_optimizer:
                shard = bucket.shard(bucket.buffer, self.ctx.dp_cp_rank)
                bucket.work = mappings.reduce_scatter_single(shard, bucket.buffer, group=self.ctx.dp_cp_group,
                                                            async_op=True)
            else:
                bucket.work = dist.all_reduce(bucket.buffer, group=self.ctx.dp_cp_group, async_op=True)

    def finish(self, divisor: float | None = None) -> None:
        """Wait for the DP reductions, divide every gradient by ``divisor`` (default: the DP size, so
        gradients are DP means; the trainer folds the fp16 loss scale or the global token count in),
        then sum the replicas' gradients. Float32 parameters' ``grad`` is their ``main_grad`` view;
        bf16/fp16 parameters get none (the optimizer's fp32 masters read ``main_grad``). Under the
        distributed optimizer only this rank's shard of each bucket is meaningful afterwards."""
        for bucket in self.buckets:
            if bucket.seen != bucket.expected:
                raise RuntimeError(f"a gradient bucket saw {bucket.seen} of {bucket.expected} gradients: "
                                   "call start(microbatches) with the number of backward passes")
            if bucket.work is not None:
                bucket.work.wait()
        divisor = self.ctx.dp_size if divisor is None else divisor
        for bucket in self.buckets:
            if divisor != 1:
                bucket.buffer.div_(divisor)
            for param in bucket.params:
                param.grad = param.main_grad if param.dtype == torch.float32 else None
        for params, group in self.replicas:
            _sum_over_group([param.main_grad for param in params], group)

    def shard(self, bucket: _Bucket) -> torch.Tensor:
        """This DP rank's part of a bucket's flat gradient buffer."""
        return bucket.shard(bucket.buffer, self.ctx.dp_cp_rank)


def _sum_over_group(tensors: list[torch.Tensor], group) -> None:
    """All-reduce (sum) ``tensors`` in place over ``group`` with one collective."""
    if len(tensors) == 1:  # the tied embedding: no copy of a vocabulary-sized gradient
        dist.all_reduce(tensors[0], group=group)
        return
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()

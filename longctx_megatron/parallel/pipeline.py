"""Pipeline parallelism: a cost-balanced split of the layer plan into stages, and the 1F1B schedule.

Sliding, dilated and full layers cost different amounts at a given sequence length (a full layer
at 100K tokens attends to ~50K keys per query, a sliding one to 4K), so stages are balanced by
each layer's forward FLOPs from the config (the head's cost is charged to the last stage), not by
layer count. Stages talk through batched point-to-point sends of the hidden states (and their
gradients), the pattern of Megatron-LM's non-interleaved 1F1B schedule: p - r - 1 warm-up
forwards on stage r, then one forward and one backward alternately, then the cool-down
backwards, so at most p micro-batches are alive on any stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.config.counting import head_forward_flops, layer_forward_flops
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.state import ParallelContext


def balanced_split(costs: list[float], stages: int, last_extra: float = 0.0) -> list[int]:
    """Layers per stage (contiguous, each >= 1) minimising the most expensive stage.

    ``last_extra`` is work only the last stage does (final norm, logits, loss). Exact dynamic
    programme over split points: O(stages * layers^2), instant for any real depth.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ConfigError(f"pipeline-model-parallel size {stages} needs between 1 and n_layers={n} stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing the first i layers on s stages; cut[s][i]: last stage start.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            extra = last_extra if (s == stages and i == n) else 0.0
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, end = [], n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def parse_split(text: str, n_layers: int, stages: int) -> list[int]:
    """``--pipeline-layer-split 10,8,7,7``: layers per stage, checked against the model and layout."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--pipeline-layer-split {text!r} must be comma-separated layer counts") from None
    if len(sizes) != stages or any(size < 1 for size in sizes) or sum(sizes) != n_layers:
        raise ConfigError(
            f"--pipeline-layer-split {text!r} must give {stages} positive layer counts (one per pipeline "
            f"stage) adding up to n_layers={n_layers}"
        )
    return sizes


def stage_costs(sizes: list[int], costs: list[float], last_extra: float = 0.0) -> list[float]:
    totals, start = [], 0
    for size in sizes:
        totals.append(sum(costs[start:start + size]))
        start += size
    totals[-1] += last_extra
    return totals


def plan_pipeline(config: ModelConfig, stages: int, seq_len: int, override: str | None = None):
    """(layers per stage, per-layer costs, head cost): the override if given, else the balanced split."""
    costs = layer_forward_flops(config, seq_len)
    head = head_forward_flops(config)
    sizes = parse_split(override, config.n_layers, stages) if override else balanced_split(costs, stages, head)
    return sizes, costs, head


def describe_split(config: ModelConfig, sizes: list[int], costs: list[float], head: float) -> str:
    """One line per stage: its layers, their patterns and its share of the cost (printed at start-up)."""
    plan, totals, start, lines = config.layer_plan(), stage_costs(sizes, costs, head), 0, []
    for stage, (size, total) in enumerate(zip(sizes, totals, strict=True)):
        kinds = {}
        for spec in plan[start:start + size]:
            kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
        mix = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        extras = (" + embedding" if stage == 0 else "") + (" + head" if stage == len(sizes) - 1 else "")
        lines.append(f"stage {stage}: layers {start}-{start + size - 1} ({mix}{extras}), "
                     f"{total / sum(totals):.1%} of the FLOPs")
        start += size
    return "\n".join(lines)


def stage_layers(sizes: list[int], stage: int) -> range:
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])


class _P2P:
    """Batched sends/receives of activations between neighbouring stages of one pipeline."""

    def __init__(self, ctx: ParallelContext, shape: tuple[int, ...], dtype: torch.dtype, device):
        self.ctx, self.shape, self.dtype, self.device = ctx, shape, dtype, device
        rank = ctx.pp_rank
        self.prev = ctx.pp_ranks[rank - 1] if rank > 0 else None
        self.next = ctx.pp_ranks[rank + 1] if rank < ctx.pp_size - 1 else None

    def exchange(self, send_next=None, send_prev=None, recv_next=False, recv_prev=False):
        """Post all the given sends and receives at once and wait: (from prev, from next)."""
        ops, received = [], {}
        if send_next is not None and self.next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next))
        if send_prev is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev))
        for name, wanted, peer in (("prev", recv_prev, self.prev), ("next", recv_next, self.next)):
            if wanted and peer is not None:
                received[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, received[name], peer))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return received.get("prev"), received.get("next")


def forward_backward_1f1b(model, microbatches: list[dict], ctx: ParallelContext,
                          hidden_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Run forward and backward of every micro-batch through this stage; gradients accumulate.

    ``microbatches`` are dicts with ``tokens``, ``labels`` and optionally ``loss_mask`` and
    ``position_ids`` (every stage needs the positions; only the first reads tokens, only the last
    labels). ``hidden_shape`` is one micro-batch's activation between stages: (b, s, d), with s
    divided by the TP size under sequence parallelism. Returns the micro-batch losses on the last
    stage (each already divided by the number of micro-batches, so gradients are of the mean).
    """
    count = len(microbatches)
    first, last = model.pre_process, model.post_process
    device = next(model.parameters()).device
    p2p = _P2P(ctx, hidden_shape, dtype, device)
    losses, inputs, outputs = [], [], []

    def forward(index: int, received: torch.Tensor | None) -> torch.Tensor:
        batch = microbatches[index]
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(batch["tokens"].shape[1], device=device)
        result = model(
            input_ids=batch["tokens"] if first else None, position_ids=positions,
            labels=batch["labels"] if last else None, loss_mask=batch.get("loss_mask") if last else None,
            hidden=received,
        )
        if last:
            loss = result[1] / count
            losses.append(loss.detach())
            return loss
        return result

    def backward(received: torch.Tensor | None, output: torch.Tensor, grad: torch.Tensor | None):
        torch.autograd.backward(output, grad_tensors=None if last else grad)
        return received.grad if received is not None else None

    def receive_forward() -> torch.Tensor | None:
        received = p2p.exchange(recv_prev=True)[0]
        return received.requires_grad_() if received is not None else None

    warmup = min(ctx.pp_size - ctx.pp_rank - 1, count)
    for index in range(warmup):
        received = receive_forward()
        output = forward(index, received)
        p2p.exchange(send_next=output)
        inputs.append(received)
        outputs.append(output)
    received = receive_forward() if warmup < count else None
    for index in range(warmup, count):
        output = forward(index, received)
        grad = p2p.exchange(send_next=None if last else output, recv_next=not last)[1]
        inputs.append(received)
        outputs.append(output)
        grad_input = backward(inputs.pop(0), outputs.pop(0), grad)
        if index == count - 1:
            p2p.exchange(send_prev=grad_input)
        else:
            received = p2p.exchange(send_prev=grad_input, recv_prev=True)[0]
            received = received.requires_grad_() if received is not None else None
    for _ in range(warmup):
        grad = p2p.exchange(recv_next=True)[1]
        grad_input = backward(inputs.pop(0), outputs.pop(0), grad)
        p2p.exchange(send_prev=grad_input)
    return losses


def allreduce_embedding_grads(model, ctx: ParallelContext) -> None:
    """Sum the tied embedding's gradient over its first- and last-stage copies (they must stay equal)."""
    if ctx.pp_size == 1 or ctx.embedding_group is None or not model.config.tie_embeddings:
        return
    grad = model.embedding.weight.grad
    if grad is None:
        grad = model.embedding.weight.grad = torch.zeros_like(model.embedding.weight)
    dist.all_reduce(grad, group=ctx.embedding_group)


def build_pipeline_stage(config: ModelConfig, ctx: ParallelContext, sizes: list[int], **build_kwargs):
    """This rank's stage (its layers, embedding on the first, head on the last), TP-sharded by ``ctx``."""
    return build_model(
        config, parallel=ctx, layers=stage_layers(sizes, ctx.pp_rank), pre_process=ctx.pp_rank == 0,
        post_process=ctx.pp_rank == ctx.pp_size - 1, **build_kwargs,
    )

"""Pipeline schedules: Megatron-LM's 1F1B and interleaved 1F1B, run by one executor.

1F1B: p - r - 1 warm-up forwards on stage r, then one forward and one backward alternately, then
the cool-down backwards, so at most p micro-batches are alive on a stage. Interleaved 1F1B: each
rank holds v model chunks (virtual stages), which shrinks the bubble by v. One executor runs either
order over point-to-point sends of the hidden states and their gradients. Which layers a stage
holds is parallel/pipeline_plan.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.model.loss import loss_weights, token_mean
from longctx_megatron.parallel.state import ParallelContext


def schedule_1f1b(count: int, stages: int, stage: int) -> list[tuple[str, int, int]]:
    """Megatron's non-interleaved order for one stage: (action "F"/"B", micro-batch, chunk 0)."""
    warmup = min(stages - stage - 1, count)
    order = [("F", i, 0) for i in range(warmup)]
    for i in range(count - warmup):
        order += [("F", warmup + i, 0), ("B", i, 0)]
    return order + [("B", i, 0) for i in range(count - warmup, count)]


def schedule_interleaved(count: int, stages: int, stage: int, chunks: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B: chunk c of stage r is virtual stage c * stages + r.

    Forwards take micro-batches in groups of ``stages`` through chunk 0, 1, ...; backwards walk the
    chunks in reverse. Warm-up is 2 (p - r - 1) + (v - 1) p forwards (all of them when m == p).
    """
    if count % stages:
        raise ConfigError(f"the interleaved schedule needs the micro-batch count ({count}) to be a multiple "
                          f"of the pipeline-model-parallel size ({stages})")
    total = count * chunks

    def step(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // stages) % chunks
        return (k // (stages * chunks)) * stages + k % stages, chunks - 1 - chunk if backward else chunk

    warmup = total if count == stages else min(total, 2 * (stages - stage - 1) + (chunks - 1) * stages)
    order = [("F", *step(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", *step(warmup + k, False)), ("B", *step(k, True))]
    return order + [("B", *step(k, True)) for k in range(total - warmup, total)]


def forward_backward_pipelined(chunks: list, microbatches: list[dict], ctx: ParallelContext,
                               hidden_shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                               forward_only: bool = False, loss_scale: float = 1.0,
                               per_token_loss: bool = False, timers=None) -> list[torch.Tensor]:
    """Run forward and backward of every micro-batch through this rank's model chunks; gradients accumulate.

    One chunk is plain 1F1B; several are the interleaved schedule (chunk c is virtual stage
    c * p + pp_rank). ``microbatches`` are dicts with ``tokens``, ``labels`` and optionally
    ``loss_mask``, ``position_ids`` and ``document_ids`` (every stage needs the positions and the
    documents; only the first reads tokens, only the last labels), and under context parallelism
    ``loss_tokens``, the token count of the whole micro-batch of which this rank holds a part. ``hidden_shape`` is one
    micro-batch's activation between stages: (b, s, d), with s divided by the TP size under
    sequence parallelism.

    What backward differentiates: each micro-batch's token mean divided by the micro-batch count
    (gradients are of the mean of micro-batch means, Megatron's default), or with
    ``per_token_loss`` its sum of token losses (the caller divides the gradients by the global
    batch's token count: Megatron's --calculate-per-token-loss), times ``loss_scale`` (fp16).
    Returns, on the last stage, each micro-batch's sum of token losses (detached), from which the
    caller reports sum / tokens over the global batch in either mode, as Megatron does.
    ``forward_only`` runs the forwards alone without autograd (evaluation).

    Sends are posted without waiting (each message has a unique tag) and only receives block, so
    any dependency-respecting order, as both schedules are, cannot deadlock.

    ``timers`` (training/timers.py, ``timers(name, level)`` a context manager) time Megatron's
    level-2 intervals: forward-compute, backward-compute, forward-recv and backward-recv.
    """
    timed = timers if timers is not None else (lambda name, level: contextlib.nullcontext())
    count, stages, rank, virtual = len(microbatches), ctx.pp_size, ctx.pp_rank, len(chunks) * ctx.pp_size
    order = (schedule_1f1b(count, stages, rank) if len(chunks) == 1
             else schedule_interleaved(count, stages, rank, len(chunks)))
    if forward_only:
        order = [action for action in order if action[0] == "F"]
    device = next(chunks[0].parameters()).device
    next_rank, prev_rank = ctx.pp_ranks[(rank + 1) % stages], ctx.pp_ranks[(rank - 1) % stages]
    losses, alive, sends = [], {}, []

    def tag(backward: bool, micro: int, virtual_stage: int) -> int:
        return (micro * virtual + virtual_stage) * 2 + int(backward)

    def receive(source: int, message_tag: int) -> torch.Tensor:
        buffer = torch.empty(hidden_shape, dtype=dtype, device=device)
        dist.recv(buffer, source, tag=message_tag)
        return buffer

    grad_mode = torch.no_grad() if forward_only else contextlib.nullcontext()
    for action, micro, chunk in order:
        model, virtual_stage = chunks[chunk], chunk * stages + rank
        if action == "F":
            received = None
            if not model.pre_process:
                with timed("forward-recv", 2):
                    received = receive(prev_rank, tag(False, micro, virtual_stage))
                received.requires_grad_(not forward_only)
            batch = microbatches[micro]
            positions = batch.get("position_ids")
            if positions is None:
                positions = torch.arange(batch["tokens"].shape[1], device=device)
            with grad_mode, timed("forward-compute", 2):
                result = model(
                    input_ids=batch["tokens"] if model.pre_process else None, position_ids=positions,
                    labels=batch["labels"] if model.post_process else None,
                    loss_mask=batch.get("loss_mask") if model.post_process else None, hidden=received,
                    loss_reduction="sum", document_ids=batch.get("document_ids"),
                )
            if model.post_process:
                total = result[1]
                losses.append(total.detach())
                if not per_token_loss:  # the token mean, as the head's "mean" reduction forms it
                    weights = batch.get("loss_tokens")  # context parallelism: the whole micro-batch's count
                    if weights is None:
                        weights = loss_weights(batch["labels"], batch.get("loss_mask"))
                    total = token_mean(total, weights) / count
                result = total * loss_scale
            else:
                sends.append(dist.isend(result.detach().contiguous(), next_rank,
                                        tag=tag(False, micro, virtual_stage + 1)))
            if not forward_only:
                alive[micro, chunk] = (received, result)
        else:
            received, output = alive.pop((micro, chunk))
            grad = None
            if not model.post_process:
                with timed("backward-recv", 2):
                    grad = receive(next_rank, tag(True, micro, virtual_stage))
            with timed("backward-compute", 2):
                torch.autograd.backward(output, grad_tensors=grad)
            if received is not None:
                sends.append(dist.isend(received.grad.contiguous(), prev_rank, tag=tag(True, micro, virtual_stage - 1)))
    for work in sends:
        work.wait()
    return losses

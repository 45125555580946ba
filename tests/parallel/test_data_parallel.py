"""Data parallelism (with TP and PP, plain and ZeRO-1 optimizer) against the single-process run."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.model.build import build_model
from longctx_megatron.parallel.data_parallel import DataParallelGradients
from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer
from longctx_megatron.parallel.grad_norm import clip_grad_norm, norm_weights
from longctx_megatron.parallel.pipeline_schedule import forward_backward_pipelined
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.parallel.tensor import tensor_parallel_shards
from longctx_megatron.training.stages import build_pipeline_chunks
from tests.distributed import run_on_ranks
from tests.parallel.test_pipeline import CONFIG
from tests.parallel.test_tensor_parallel import gather_global

SEQ, MICRO_PER_RANK, STEPS, LR, WD, CLIP = 24, 2, 3, 3e-3, 0.1, 0.5


def _optimizer(params):
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": WD},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))


def _body(rank, world_size, tp, pp, dp, distributed_optimizer):
    ctx = initialize_parallel(tensor=tp, pipeline=pp, backend="gloo")
    config = ModelConfig(**CONFIG)
    generator = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 97, (STEPS, dp * MICRO_PER_RANK, SEQ), generator=generator)
    labels = torch.randint(0, 97, (STEPS, dp * MICRO_PER_RANK, SEQ), generator=generator)

    reference = build_model(config, seed=5, attention_backend="chunked")
    ref_opt = _optimizer(reference.parameters())
    sizes = [config.n_layers // pp] * pp
    chunks = build_pipeline_chunks(config, ctx, sizes, seed=5, attention_backend="chunked", sequence_parallel=tp > 1)
    grads = DataParallelGradients(chunks, ctx, bucket_mb=0.02, distributed_optimizer=distributed_optimizer)
    assert len(grads.buckets) > 2  # small buckets: several reductions overlap the backward pass
    if distributed_optimizer:
        optimizer = DistributedOptimizer(grads, norm_weights(chunks, ctx), lr=LR, betas=(0.9, 0.95), weight_decay=WD)
    else:
        optimizer = _optimizer(p for chunk in chunks for p in chunk.parameters())
    mine = slice(ctx.dp_rank * MICRO_PER_RANK, (ctx.dp_rank + 1) * MICRO_PER_RANK)
    result = {"losses": [], "ref_losses": [], "norms": [], "ref_norms": []}
    for step in range(STEPS):
        _, ref_loss = reference(tokens[step], labels=labels[step])
        ref_opt.zero_grad()
        ref_loss.backward()
        result["ref_norms"].append(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP).item())
        ref_opt.step()
        result["ref_losses"].append(ref_loss.item())

        batches = [{"tokens": t[None], "labels": y[None]} for t, y in zip(tokens[step][mine], labels[step][mine],
                                                                          strict=True)]
        grads.start(len(batches))
        losses = forward_backward_pipelined(chunks, batches, ctx, (1, SEQ // tp, config.d_model))
        grads.finish()
        if distributed_optimizer:
            norm = optimizer.step(CLIP)
        else:
            norm = clip_grad_norm(chunks, CLIP, ctx)
            optimizer.step()
        result["norms"].append(norm.item())
        if losses:
            result["losses"].append(sum(losses).item() / (len(batches) * SEQ))  # token-loss sums -> mean
    # Adam divides by sqrt(v): for gradients near zero, fp32 summation-order differences move an update
    # by a visible fraction of lr, so weights agree to 1e-5 absolute (lr is 3e-3), losses to 1e-5 relative.
    ref_params = dict(reference.named_parameters())
    for chunk in chunks:
        shards = tensor_parallel_shards(chunk)
        for name, param in chunk.named_parameters():
            value = gather_global(param.detach(), shards[name], ctx.tp_group) if name in shards else param.detach()
            torch.testing.assert_close(value, ref_params[name].detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{n} after {STEPS} steps: {m}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,distributed_optimizer", [
    (1, 1, 2, False), (2, 1, 2, False), (1, 2, 2, False), (1, 1, 2, True), (2, 1, 2, True), (1, 2, 2, True),
], ids=["dp2", "tp2xdp2", "pp2xdp2", "dp2-zero1", "tp2xdp2-zero1", "pp2xdp2-zero1"])
def test_data_parallel_matches_single_process(tp, pp, dp, distributed_optimizer):
    results = run_on_ranks(_body, tp * pp * dp, tp, pp, dp, distributed_optimizer)
    for result in results:
        assert result["norms"] == pytest.approx(result["ref_norms"], rel=1e-5)
    last_stage = [r for r in results if r["losses"]]
    assert len(last_stage) == tp * dp
    mean = [sum(values) / len(values) for values in zip(*(r["losses"] for r in last_stage), strict=True)]
    assert mean == pytest.approx(last_stage[0]["ref_losses"], rel=1e-5)

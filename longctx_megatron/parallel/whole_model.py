"""This rank's tensor-parallel shard of the whole layer stack, assembled from the training chunks.

Inference (InferenceEngine) needs every layer on each tensor rank, while training under pipeline
parallelism holds only some stages per rank, and under sequence parallelism its layers expect
sequence-sharded activations. ``whole_model`` builds a fresh model of all layers, TP-sharded as
the chunks are but without sequence parallelism or recomputation, and fills it with the chunks'
current weights: the ones this rank holds are copied, the others are broadcast over the pipeline
group from the stage that holds them (parameters keep their global names on every stage, so
names match). Every rank of the job calls it together. Under tensor parallelism each rank gets
its own shard; nothing is gathered across TP. The copy costs one whole-stack TP shard of memory
for as long as the caller keeps it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.transformer import GPTModel
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.state import ParallelContext


@torch.no_grad()
def whole_model(chunks: list[GPTModel], config: ModelConfig, ctx: ParallelContext, device: torch.device,
                attention_backend: str = "auto") -> GPTModel:
    """A whole-stack copy of the chunks' weights (in their dtype) on ``device``, in eval mode.
    Training's random state is left as it was (building a parallel model seeds the generators)."""
    held: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            held.setdefault(name, param)
    dtype = next(iter(held.values())).dtype
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_parallel_model(config, ctx, "meta", attention_backend=attention_backend).to(dtype)
    model.to_empty(device=device)
    owners = _owners(held, ctx)
    for name, param in model.named_parameters():  # checked on every rank before any broadcast
        if name not in owners:
            raise RuntimeError(f"{name}: no pipeline stage holds this parameter")
        if owners[name][1] != tuple(param.shape):
            raise RuntimeError(f"{name}: the chunk's shard {owners[name][1]} differs from the whole model's "
                               f"{tuple(param.shape)}")
    for name, param in model.named_parameters():
        owner = owners[name][0]
        if owner == ctx.pp_rank:
            param.copy_(held[name])
        if ctx.pp_size > 1:
            dist.broadcast(param.data, src=ctx.pp_ranks[owner], group=ctx.pp_group)
    return model.eval()


def _owners(held: dict[str, torch.Tensor], ctx: ParallelContext) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Parameter name -> (the lowest pipeline rank that holds it, its shape there)."""
    mine = {name: tuple(param.shape) for name, param in held.items()}
    if ctx.pp_size == 1:
        return {name: (0, shape) for name, shape in mine.items()}
    every: list[dict] = [{} for _ in range(ctx.pp_size)]
    dist.all_gather_object(every, mine, group=ctx.pp_group)
    owners: dict[str, tuple[int, tuple[int, ...]]] = {}
    for rank, shapes in enumerate(every):
        for name, shape in shapes.items():
            owners.setdefault(name, (rank, shape))
    return owners

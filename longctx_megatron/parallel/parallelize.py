"""Parallelism applied to a built plain model, in one documented order (torchtitan's parallelize step).

``build_parallel_model`` builds a model (or a pipeline stage of one) on the meta device, applies:

1. tensor parallelism, with sequence parallelism when asked (parallel/tensor.py): projections,
   embedding, output and head become Megatron's parallel layers; core attention is rebuilt for
   this rank's heads; modules drawing dropout in sharded regions get the per-rank RNG stream;
2. context parallelism (parallel/context.py): with a CP group, every core attention becomes its
   context-parallel version (for the heads tensor parallelism left this rank);
3. activation recomputation (``apply_recompute``), outermost, so a recomputed block re-runs its
   collectives too;

then materialises it: every rank fills its slices from the global tensors (model/init.py), so any
layout starts from the same weights. Data parallelism (gradient buckets, ZeRO-1) is applied by the
trainer to the resulting chunks; the pipeline split chooses which layers a stage builds.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.build import build_model, materialize
from longctx_megatron.model.transformer import GPTModel
from longctx_megatron.parallel.context import apply_context_parallel
from longctx_megatron.parallel.random import model_parallel_rng
from longctx_megatron.parallel.state import ParallelContext
from longctx_megatron.parallel.tensor import apply_tensor_parallel, tensor_parallel_shards

# Megatron's --recompute-granularity: "full" keeps only each block's input and recomputes the whole
# block in backward; "selective" recomputes only the attention (its scores and softmax dominate
# activation memory at long context).
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
_RECOMPUTED_CLASSES: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    """``cls`` whose forward, when autograd records, keeps only its inputs and recomputes in backward."""
    if cls not in _RECOMPUTED_CLASSES:
        class Recomputed(cls):
            def forward(self, *args):
                if torch.is_grad_enabled():
                    return checkpoint(super().forward, *args, use_reentrant=False)
                return super().forward(*args)

        Recomputed.__name__ = Recomputed.__qualname__ = f"Recomputed{cls.__name__}"
        _RECOMPUTED_CLASSES[cls] = Recomputed
    return _RECOMPUTED_CLASSES[cls]


def recompute(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``module`` in activation recomputation in place. The wrapper is a subclass swapped in (as
    FSDP2's fully_shard does), not a parent module, so parameter names stay global and unchanged."""
    module.__class__ = _recomputed_class(type(module))
    return module


def apply_recompute(model: GPTModel, granularity: str = "none", first_layers: int | None = None) -> GPTModel:
    """Recompute every block (``full``; only the first ``first_layers`` of this chunk when given, Megatron's
    ``--recompute-method block``) or every block's attention (``selective``)."""
    if granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"recompute granularity {granularity!r} is not one of {RECOMPUTE_GRANULARITIES}")
    for index, block in enumerate(model.layers):
        if granularity == "full":
            if first_layers is None or index < first_layers:
                recompute(block)
        elif granularity == "selective":
            recompute(block.attention)
    return model


def build_parallel_model(
    config: ModelConfig,
    ctx: ParallelContext,
    device: str | torch.device = "cpu",
    seed: int = 1234,
    attention_backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute_granularity: str = "none",
    recompute_first_layers: int | None = None,
    layers: range | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    cp_comm_type: str = "p2p",
) -> GPTModel:
    """This rank's part of the model: the stage ``layers`` / ``pre_process`` / ``post_process``,
    sharded over ``ctx``'s TP group (and its sequence over the CP group, exchanging by
    ``cp_comm_type``). Its RNG tracker (dropout in sharded regions, saved with
    checkpoints) is ``model.rng_tracker``, seeded from ``seed`` as Megatron seeds it."""
    model = build_model(config, "meta", attention_backend=attention_backend, layers=layers, pre_process=pre_process,
                        post_process=post_process)
    model.rng_tracker = model_parallel_rng(seed, ctx.tp_rank, ctx.pp_rank, torch.device(device).type, ctx.cp_rank)
    apply_tensor_parallel(model, ctx, model.rng_tracker, sequence_parallel)
    apply_context_parallel(model, ctx, cp_comm_type)
    apply_recompute(model, recompute_granularity, recompute_first_layers)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device, seed, dtype, tensor_parallel_shards(model))

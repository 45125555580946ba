"""apply_tensor_parallel: turn a built plain GPTModel into this rank's tensor-parallel shard.

One plan names the modules to swap; each new layer holds its slice of the same global weight (the
old module's values when the model is already materialised, else filled later by the initialiser
from the global tensor). The model's code is untouched: attention reads its local head count from
the sharded QKV weight and its global KV-head offset from ``first_kv_head``.
"""

from __future__ import annotations

import torch

from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from longctx_megatron.parallel.random import RNGStatesTracker
from longctx_megatron.parallel.state import ParallelContext, check_model_fits_layout

# Module name suffix -> (split, stacked parts). Column: output features; row: input features.
TENSOR_PARALLEL_PLAN = {
    "attention.qkv": ("column", 1),  # grouped layout: whole KV groups are contiguous rows
    "attention.out": ("row", 1),
    "mlp.gate_up": ("column", 2),  # [gate; up], each half split on its own
    "mlp.down": ("row", 1),
}


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    old_weight = getattr(old, "weight", None)
    if old_weight is not None and not old_weight.is_meta:
        with torch.no_grad():
            new.weight.copy_(new.weight_shard.take(old_weight))
    setattr(parent, child, new)


def apply_tensor_parallel(
    model: torch.nn.Module, ctx: ParallelContext, rng: RNGStatesTracker, sequence_parallel: bool = False
) -> torch.nn.Module:
    """Shard ``model`` (a GPTModel) in place for this rank; returns it. TP=1 leaves it unchanged."""
    config = model.config
    check_model_fits_layout(config, ctx.tp_size)
    if ctx.tp_size == 1:
        return model
    device = next(model.parameters()).device
    sp = sequence_parallel
    for name, module in list(model.named_modules()):
        plan = next((p for suffix, p in TENSOR_PARALLEL_PLAN.items() if name.endswith(suffix)), None)
        if plan is None:
            continue
        style, parts = plan
        if style == "column":
            new = ColumnParallelLinear(module.in_features, module.out_features, ctx, sequence_parallel=sp,
                                       parts=parts, device=device)
        else:
            new = RowParallelLinear(module.in_features, module.out_features, ctx, sequence_parallel=sp, device=device)
        _replace(model, name, new)
    if model.embedding is not None:
        embedding = VocabParallelEmbedding(config.vocab_size, config.d_model, ctx, sp, device=device)
        _replace(model, "embedding", embedding)
    if model.output is not None:  # untied output weight: split by vocabulary like the embedding
        padded = padded_vocab_size(config.vocab_size, ctx.tp_size)
        output = ColumnParallelLinear(config.d_model, config.vocab_size, ctx, padded_out_features=padded, device=device)
        _replace(model, "output", output)
    if model.head is not None:
        model.head = VocabParallelHead(config.vocab_size, ctx, sp)

    kv_per_rank = config.n_kv_heads // ctx.tp_size
    for layer in model.layers:
        layer.attention.first_kv_head = ctx.tp_rank * kv_per_rank
        layer.attention.dropout_rng = rng.fork  # heads differ per rank: per-rank dropout masks
        if sp:
            layer.dropout_rng = rng.fork  # sequence shards differ per rank too
            layer.attention_norm.sequence_parallel_replica = layer.mlp_norm.sequence_parallel_replica = True
    if sp:
        model.dropout_rng = rng.fork
        if model.final_norm is not None:
            model.final_norm.sequence_parallel_replica = True
    return model


def tensor_parallel_shards(model: torch.nn.Module) -> dict[str, ShardSpec]:
    """Global-parameter name -> this rank's ShardSpec, for every sharded parameter."""
    return {
        f"{name}.weight": module.weight_shard
        for name, module in model.named_modules()
        if getattr(module, "weight_shard", None) is not None
    }


def sequence_parallel_replicas(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters replicated across TP but fed sequence shards (the norms, marked
    ``sequence_parallel_replica`` by apply_tensor_parallel): their gradients are summed over TP."""
    return [
        param
        for module in model.modules()
        if getattr(module, "sequence_parallel_replica", False)
        for param in module.parameters(recurse=False)
    ]


def shard_spec_for(name: str, global_shape: tuple[int, ...], vocab_size: int, rank: int, size: int
                   ) -> ShardSpec | None:
    """The ShardSpec that ``apply_tensor_parallel`` gives parameter ``name`` on TP rank ``rank`` of
    ``size`` (None for a replicated one): the same plan, for tools that cut tensors without a model."""
    if size == 1:
        return None
    module = name.removesuffix(".weight")
    if module in ("embedding", "output"):
        return ShardSpec(0, rank, size, tuple(global_shape), padded_vocab_size(vocab_size, size))
    plan = next((p for suffix, p in TENSOR_PARALLEL_PLAN.items() if module.endswith(suffix)), None)
    if plan is None:
        return None
    style, parts = plan
    dim = 0 if style == "column" else 1
    return ShardSpec(dim, rank, size, tuple(global_shape), global_shape[dim], parts)

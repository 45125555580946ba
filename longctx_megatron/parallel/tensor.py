"""apply_tensor_parallel: turn a built plain GPTModel into this rank's tensor-parallel shard.

One plan names the projections to swap and how each splits (column: output features; row: input
features); how many stacked parts a fused weight has comes from the layout its module declares
(model/fused.py), never from its name. Each new layer holds its slice of the same global weight
(the old module's values when the model is already materialised, else filled later by the
initialiser from the global tensor). Core attention is rebuilt for the rank's heads (its global
first KV head sets the dilated offsets) and draws dropout from the per-rank stream; under sequence
parallelism the hidden dropouts do too.
"""

from __future__ import annotations

import torch

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.vocab import padded_vocab_size
from longctx_megatron.model.attention.layer import CoreAttention
from longctx_megatron.model.attention.patterns import pattern_for
from longctx_megatron.model.build import build_model
from longctx_megatron.model.dropout import Dropout
from longctx_megatron.model.fused import fused_layouts
from longctx_megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    ShardSpec,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from longctx_megatron.parallel.random import RNGStatesTracker
from longctx_megatron.parallel.state import ParallelContext, check_model_fits_layout

# Module name suffix -> split. Grouped QKV keeps whole KV groups contiguous, so a column split of
# its rows gives each rank complete heads.
TENSOR_PARALLEL_PLAN = {"attention.qkv": "column", "attention.out": "row", "mlp.gate_up": "column", "mlp.down": "row"}
VOCABULARY_PARALLEL = ("embedding", "output")  # split by (padded) vocabulary rows


def tensor_parallel_plan(model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """Module name -> (split "column" | "row", stacked parts) for every projection the plan shards."""
    layouts, plan = fused_layouts(model), {}
    for name, _ in model.named_modules():
        style = next((s for suffix, s in TENSOR_PARALLEL_PLAN.items() if name.endswith(suffix)), None)
        if style is not None:
            layout = layouts.get(f"{name}.weight")
            plan[name] = (style, layout.parts if layout is not None else 1)
    return plan


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
    for name, (style, parts) in tensor_parallel_plan(model).items():
        module = model.get_submodule(name)
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
        attention, core = layer.attention, layer.attention.core_attention
        pattern = pattern_for(attention.spec, attention.group_size, ctx.tp_rank * kv_per_rank)
        # Heads differ per rank: per-rank attention-dropout masks.
        attention.core_attention = CoreAttention(pattern, core.dropout, core.backend, dropout_rng=rng.fork)
        attention.core_attention.train(core.training)
        if sp:  # sequence shards differ per rank too
            layer.attention_out_dropout = _forked(layer.attention_out_dropout, rng)
            layer.mlp_out_dropout = _forked(layer.mlp_out_dropout, rng)
    if sp and model.embedding_dropout is not None:
        model.embedding_dropout = _forked(model.embedding_dropout, rng)
    return model


def _forked(dropout: Dropout, rng: RNGStatesTracker) -> Dropout:
    """``dropout`` drawing its masks from the per-rank stream (same p, same train/eval mode)."""
    return Dropout(dropout.p, rng.fork).train(dropout.training)


def tensor_parallel_shards(model: torch.nn.Module) -> dict[str, ShardSpec]:
    """Global-parameter name -> this rank's ShardSpec, for every sharded parameter."""
    return {
        f"{name}.weight": module.weight_shard
        for name, module in model.named_modules()
        if getattr(module, "weight_shard", None) is not None
    }


def offline_shard_specs(config: ModelConfig, size: int) -> list[dict[str, ShardSpec]]:
    """For each TP rank of ``size``: global-parameter name -> the ShardSpec ``apply_tensor_parallel``
    gives it (replicated ones absent). The same plan and declared layouts, read from one meta model,
    for tools that cut tensors without a process group."""
    if size == 1:
        return [{}]
    model = build_model(config, device="meta")
    vocabulary = [f"{name}.weight" for name in VOCABULARY_PARALLEL if getattr(model, name) is not None]
    projections = [(f"{name}.weight", style, parts, tuple(model.get_submodule(name).weight.shape))
                   for name, (style, parts) in tensor_parallel_plan(model).items()]
    padded = padded_vocab_size(config.vocab_size, size)
    specs = []
    for rank in range(size):
        mine = {name: ShardSpec(0, rank, size, (config.vocab_size, config.d_model), padded) for name in vocabulary}
        for name, style, parts, shape in projections:
            dim = 0 if style == "column" else 1
            mine[name] = ShardSpec(dim, rank, size, shape, shape[dim], parts)
        specs.append(mine)
    return specs


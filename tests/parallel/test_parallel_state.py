"""Process-group layout (Megatron rank order) and start-up errors for bad layouts."""

from __future__ import annotations

import re

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.parallel import state
from longctx_megatron.parallel.state import ParallelLayoutError, check_layout, check_model_fits_layout, layout_ranks
from tests.distributed import run_on_ranks


def test_megatron_rank_order():
    layout = layout_ranks(8, tensor=2, pipeline=2)
    assert layout["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout["cp"] == [[r] for r in range(8)] and layout["dp_cp"] == layout["dp"]
    layout = layout_ranks(8, tensor=8, pipeline=1)
    assert layout["tp"] == [list(range(8))] and layout["dp"] == [[r] for r in range(8)]
    assert layout["pp"] == [[r] for r in range(8)]


def test_megatron_rank_order_with_context_parallel():
    """tp-cp-dp-pp, as Megatron's RankGenerator orders them: 16 ranks = TP2 x CP2 x DP2 x PP2."""
    layout = layout_ranks(16, tensor=2, pipeline=2, context=2)
    assert layout["tp"][:2] == [[0, 1], [2, 3]]
    assert layout["cp"][:3] == [[0, 2], [1, 3], [4, 6]]
    assert layout["dp"][:3] == [[0, 4], [1, 5], [2, 6]]
    assert layout["pp"][:2] == [[0, 8], [1, 9]]
    assert layout["dp_cp"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]


@pytest.mark.parametrize(
    "world,tensor,pipeline,data,context,message",
    [
        (6, 4, 1, None, 1, "world size 6 is not divisible by (tensor 4 x pipeline 1) = 4"),
        (8, 2, 3, None, 1, "world size 8 is not divisible by (tensor 2 x pipeline 3) = 6"),
        (8, 2, 1, None, 3, "world size 8 is not divisible by (tensor 2 x pipeline 1 x context 3) = 6"),
        (4, 1, 1, None, 0, "context-parallel size 0 must be >= 1"),
        (8, 2, 2, 4, 1, "data-parallel size 4 does not match world size 8 / (tensor 2 x pipeline 2) = 2"),
        (8, 2, 1, 4, 2, "data-parallel size 4 does not match world size 8 / (tensor 2 x pipeline 1 x context 2) = 2"),
        (4, 0, 1, None, 1, "tensor-model-parallel size 0 must be >= 1"),
    ],
)
def test_bad_sizes_fail_before_any_group(world, tensor, pipeline, data, context, message):
    with pytest.raises(ParallelLayoutError, match=re.escape(message)):
        check_layout(world, tensor, pipeline, data, context)


@pytest.mark.parametrize(
    "overrides,tp,message",
    [
        (dict(n_heads=8, n_kv_heads=2), 4, "tensor-model-parallel size 4 must divide n_kv_heads=2 (each rank owns "
                                          "whole KV heads and their query heads); use a tensor size among [1, 2]"),
        (dict(n_heads=6, n_kv_heads=6, d_model=96), 4, "tensor-model-parallel size 4 must divide n_heads=6"),
        (dict(d_ff=90), 4, "tensor-model-parallel size 4 must divide d_ff=90"),
    ],
)
def test_model_shape_must_split(overrides, tp, message):
    config = ModelConfig(**{**dict(d_model=64, n_layers=1, n_heads=8, n_kv_heads=4, d_ff=96, vocab_size=50,
                                   max_seq_len=64, attention_layout="full:1"), **overrides})
    with pytest.raises(ParallelLayoutError, match=re.escape(message)):
        check_model_fits_layout(config, tp)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nccl_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(state.dist, "is_initialized", lambda: False)
    with pytest.raises(ParallelLayoutError, match="backend 'nccl' needs CUDA devices; use 'gloo' on CPU"):
        state.initialize_parallel(tensor=1, backend="nccl")


def _groups_body(rank, world_size):
    ctx = state.initialize_parallel(tensor=2, pipeline=2, backend="gloo")
    return dict(
        tp=ctx.tp_ranks, dp=ctx.dp_ranks, pp=ctx.pp_ranks, ranks=(ctx.tp_rank, ctx.dp_rank, ctx.pp_rank),
        sizes=(ctx.tp_size, ctx.dp_size, ctx.pp_size), src=(ctx.tp_ranks[0], ctx.pp_ranks[0], ctx.pp_ranks[-1]),
    )


@pytest.mark.slow
def test_initialize_parallel_under_env_launch():
    """Four ranks launched with env:// variables (as torchrun does) get TP=2 x PP=2 groups."""
    result = run_on_ranks(_groups_body, 4)
    assert [r["tp"] for r in result] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [r["pp"] for r in result] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [r["dp"] for r in result] == [(0,), (1,), (2,), (3,)]
    assert [r["ranks"] for r in result] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)]
    assert all(r["sizes"] == (2, 1, 2) for r in result)
    assert result[3]["src"] == (2, 1, 3)

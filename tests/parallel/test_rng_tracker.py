"""The model-parallel RNG tracker: per-TP-rank dropout in sharded regions, shared elsewhere, resumable."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.parallel.parallelize import build_parallel_model
from longctx_megatron.parallel.random import MODEL_PARALLEL_RNG, RNGStatesTracker, model_parallel_rng
from longctx_megatron.parallel.state import initialize_parallel
from tests.distributed import run_on_ranks


def test_fork_uses_its_own_stream_and_leaves_the_default_alone():
    tracker = model_parallel_rng(seed=5, tp_rank=1)
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the tracked stream advanced
    replay = model_parallel_rng(seed=5, tp_rank=1)
    with replay.fork():
        assert torch.equal(torch.rand(4), first)
    other_rank = model_parallel_rng(seed=5, tp_rank=0)
    with other_rank.fork():
        assert not torch.equal(torch.rand(4), first)


def test_states_save_and_restore():
    tracker = model_parallel_rng(seed=9)
    with tracker.fork():
        torch.rand(3)
    saved = tracker.get_states()
    with tracker.fork():
        expected = torch.rand(3)
    restored = RNGStatesTracker()
    restored.set_states(saved)
    with restored.fork(MODEL_PARALLEL_RNG):
        assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add(MODEL_PARALLEL_RNG, 1)


def _dropout_body(rank, world_size, sizes):
    ctx = initialize_parallel(**sizes, backend="gloo")
    config = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=50, max_seq_len=64,
                         attention_layout="full:1", attention_dropout=0.5, hidden_dropout=0.5)
    model = build_parallel_model(config, ctx, seed=3, attention_backend="chunked")
    attention = model.layers[0].attention.core_attention
    if ctx.tp_size > 1:
        assert attention.dropout_rng == model.rng_tracker.fork  # attention dropout runs in the per-rank stream
    with attention.dropout_rng():
        inside = torch.nn.functional.dropout(torch.ones(64), 0.5)
    outside = torch.nn.functional.dropout(torch.ones(64), 0.5)
    return inside, outside


@pytest.mark.slow
def test_dropout_masks_differ_inside_tp_regions_only():
    (inside_0, outside_0), (inside_1, outside_1) = run_on_ranks(_dropout_body, 2, {"tensor": 2})
    assert not torch.equal(inside_0, inside_1)
    assert torch.equal(outside_0, outside_1)


@pytest.mark.slow
def test_context_parallel_ranks_draw_their_own_masks_everywhere():
    """CP ranks hold different positions of one sample: no dropout mask may repeat across them."""
    (inside_0, outside_0), (inside_1, outside_1) = run_on_ranks(_dropout_body, 2, {"context": 2})
    assert not torch.equal(inside_0, inside_1)
    assert not torch.equal(outside_0, outside_1)


def test_context_parallel_rank_zero_keeps_the_seeds_of_a_run_without_it():
    for cp_rank in (0, 1):
        model_parallel_rng(seed=5, tp_rank=1, pp_rank=1, cp_rank=cp_rank)
        default = torch.rand(4)
        model_parallel_rng(seed=5, tp_rank=1, pp_rank=1)
        assert torch.equal(torch.rand(4), default) == (cp_rank == 0)

"""The inference memory model against the measured peak of a real prefill and decode, and its scaling.

Every cell of the grid (each layer kind alone and the mixed plan, batch 1 and 4, a short and a long
prompt, fp32 and bf16) runs ``InferenceEngine`` on the CPU under ``PeakTracker``; the estimate must be
within 10% of the peak of the prefill, of the decode steps and of the whole run, its cache terms
must be what the caches hold, and its working sets (the part beyond weights and caches, which the
weights hide in the small cells) must be within 15%. The off-CPU estimate (``device_type="cuda"``) is
held to the same bounds by cells whose attention is forced through ``masked_sdpa``'s block kernel.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.inference import attention
from longctx_megatron.inference.cache import GROW
from longctx_megatron.memory.inference import estimate_inference
from longctx_megatron.memory.inference_grid import DTYPES, GRID, PROMPTS, Cell, measure
from longctx_megatron.model.attention.backends import recompute


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the cells are tiny, and threads contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _measured(cell: Cell):
    return measure(cell)


def _cache_terms(estimate) -> dict[str, int]:
    return {name.split(": ")[1].split(" ")[0]: size for name, size in estimate.terms.items()
            if name.startswith("kv cache")}


def _working_set(estimate) -> int:
    return next(size for name, size in estimate.terms.items() if "working set" in name)


@pytest.mark.parametrize("cell", GRID, ids=lambda cell: cell.name)
def test_estimate_is_within_10_percent_of_the_measured_peak(cell):
    measured = _measured(cell)
    assert cell.estimate().total == pytest.approx(measured.peak, rel=0.10)
    for phase, peak in (("prefill", measured.prefill), ("decode", measured.decode)):
        estimate = cell.estimate(phase)
        assert estimate.total == pytest.approx(peak, rel=0.10), phase
        assert _cache_terms(estimate) == {kind: size for kind, size in measured.caches.items()}, phase
        held = estimate.total - _working_set(estimate)
        assert _working_set(estimate) == pytest.approx(peak - held, rel=0.15), phase


@pytest.mark.parametrize("budget", [None, 1024], ids=["default-groups", "blocks-of-a-few-rows"])
@pytest.mark.parametrize("cell", [Cell("mixed", 4, "long", "bf16"), Cell("dilated", 4, "short", "fp32")],
                         ids=lambda cell: cell.name)
def test_the_off_cpu_estimate_follows_the_block_kernel(cell, budget, monkeypatch):
    """What CUDA runs, measured on the CPU: inference attention through ``masked_sdpa(fused=False)``,
    with the default score budget (one block of the chunk's rows) and with one of 1024 scores, which
    cuts every chunk into blocks of one or a few rows (padded where they do not divide it)."""
    monkeypatch.setattr(attention, "masked_sdpa", functools.partial(recompute.masked_sdpa, fused=False))
    if budget is not None:
        monkeypatch.setattr(recompute, "SCORES_PER_GROUP", budget)
    measured = measure(cell)
    for phase, peak in (("prefill", measured.prefill), ("decode", measured.decode)):
        estimate = estimate_inference(cell.config, cell.batch, PROMPTS[cell.prompt], cell.new_tokens,
                                      DTYPES[cell.dtype], cell.chunk, device_type="cuda", phase=phase)
        assert estimate.total == pytest.approx(peak, rel=0.10), phase
        held = estimate.total - _working_set(estimate)
        assert _working_set(estimate) == pytest.approx(peak - held, rel=0.15), phase


def _design(**overrides) -> ModelConfig:
    return ModelConfig(**overrides)  # the design's 7B: 16 sliding (4096, G=128), 12 dilated (1024 x 4), 4 full


def test_the_7b_at_100k_is_answered_instantly_and_its_caches_are_the_design_numbers():
    start = time.perf_counter()
    estimate = estimate_inference(_design(), 1, 100_000, 1_000, torch.bfloat16)
    assert time.perf_counter() - start < 1.0
    per_position = 2 * 8 * 128 * 2  # K and V of 8 KV heads x 128 in bf16: 4 KiB per token per layer
    positions = -(-101_000 // GROW) * GROW
    terms = estimate.terms
    assert terms["kv cache: full (4 layers)"] == 4 * positions * per_position
    assert terms["kv cache: dilated (12 layers)"] == 12 * 4096 * (per_position + 8)  # ring of W*r, int64 positions
    history = 16 * positions * per_position  # the global-query history: a full cache per sliding layer
    assert terms["kv cache: sliding (16 layers)"] > history
    on_host = estimate_inference(_design(), 1, 100_000, 1_000, torch.bfloat16, history_on_host=True,
                                 device_type="cuda")
    assert terms["kv cache: sliding (16 layers)"] - on_host.terms["kv cache: sliding (16 layers)"] == history
    assert 2.0e9 < sum(size for name, size in on_host.terms.items() if name.startswith("kv")) < 2.4e9  # ~2.2 GB


def test_a_full_cache_grows_with_length_and_a_sliding_ring_does_not_beyond_its_window():
    config = ModelConfig(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=256, vocab_size=300,
                         max_seq_len=100_000, sliding_window=64, global_every=0, dilated_window=16, dilation=2,
                         attention_layout="sliding:1,dilated:1,full:1")

    def caches(length):
        return _cache_terms(estimate_inference(config, 2, length, 1, torch.float32))

    short, long, longer = caches(2 * GROW - 1), caches(8 * GROW - 1), caches(32 * GROW - 1)
    assert long["full"] == 4 * short["full"] and longer["full"] == 4 * long["full"]
    assert short["sliding"] == long["sliding"] == longer["sliding"]
    assert short["dilated"] == long["dilated"] == longer["dilated"]


def test_tensor_parallelism_splits_the_caches_and_the_heads_weights():
    one, eight = (estimate_inference(_design(), 1, 32_768, 100, torch.bfloat16, tensor=t) for t in (1, 8))
    # Keys and values split by KV heads; the rings' int64 positions are held whole by every rank.
    assert {k: v * 8 for k, v in _cache_terms(eight).items()} == pytest.approx(_cache_terms(one), rel=0.02)
    assert eight.terms["weights"] < one.terms["weights"] / 7
    with pytest.raises(ValueError, match="does not split"):
        estimate_inference(_design(), 1, 1024, 1, torch.bfloat16, tensor=16)

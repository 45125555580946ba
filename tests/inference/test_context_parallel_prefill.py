"""Prefill over a context-parallel group, then decode: the logits equal one process's at every step
(fp32), for CP 2 and 4, with prompts of different lengths whose CP chunks are shorter than the
window, and every layer kind (sliding with global tokens, dilated, full)."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.inference.engine import InferenceEngine
from longctx_megatron.model.build import build_model
from tests.distributed import run_on_ranks
from tests.inference.test_decode_matches_forward import _config

PROMPTS = [45, 40]  # lengths; the CP part is the first 36 (CP2) or 32 (CP4) tokens, the rest chunked
STEPS = 6


def _generate(engine) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (length,), generator=generator).tolist() for length in PROMPTS]
    cache, logits = engine.prefill(prompts)
    steps = [logits]
    for _ in range(STEPS):
        steps.append(engine.decode(cache, steps[-1].argmax(-1)))
    return steps


def _on_ranks(rank, world):
    from longctx_megatron.parallel.state import initialize_parallel

    ctx = initialize_parallel(context=world, backend="gloo")
    engine = InferenceEngine(build_model(_config(), seed=3).eval(), prefill_chunk=5, context=ctx)
    assert "context parallel" in repr(engine.model)
    return _generate(engine)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_prefill_then_decode_equals_one_process(world):
    expected = _generate(InferenceEngine(build_model(_config(), seed=3).eval(), prefill_chunk=5))
    for steps in run_on_ranks(_on_ranks, world, timeout=300):
        for got, want in zip(steps, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

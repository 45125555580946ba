"""Every layout of the trainer in fp32, bf16 and fp16 against one process.

Parameters that must be replicas (DP copies, the tied embedding's first- and last-stage copies,
norms replicated over TP, with and without sequence parallelism) are bit-equal across ranks after
training, and so are their fp32 master weights. Each layout's fp32 losses equal the single-process
ones; in bf16 and fp16 a layout stays as close to the single-process run in the same precision as
that precision is to fp32 in one process (the tolerance is measured in the test, not assumed).
"""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.parallel import mappings
from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer
from longctx_megatron.parallel.tensor import tensor_parallel_shards
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import setup
from tests.distributed import run_on_ranks
from tests.training.test_trainer import SMALL

# fp16 starts at a loss scale no layout overflows at: a micro-batch's loss is divided by this rank's
# micro-batch count (as in Megatron), so with DP=2 each fp16 gradient is twice the single-process one
# and the default 2^16 overflows on the first step (skipped, scale halved): a different trajectory.
# Overflow handling has its own test (test_trainer.py); every run here must skip no step.
PRECISIONS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "4096"]}

LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "pp4-interleaved": (4, ["--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "1"]),
    "tp2xpp2-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--sequence-parallel"]),
    "dp2": (2, []),
    "tp2xdp2-zero1": (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]),
    "pp2xdp2-zero1": (4, ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"]),
}


def _silent(*_args) -> None:
    pass


def _global_key(trainer, name: str, shards: dict) -> tuple[str, int | None]:
    """What a parameter is a slice of: its global name and, for a TP shard, which one."""
    return name, trainer.ctx.tp_rank if name in shards else None


def _weights_and_masters(trainer) -> tuple[dict, dict]:
    """This rank's weights and (with fp32 masters) each parameter's whole master, keyed by _global_key."""
    weights, key_of = {}, {}
    for chunk in trainer.chunks:
        shards = tensor_parallel_shards(chunk)
        for name, param in chunk.named_parameters():
            key_of[param] = _global_key(trainer, name, shards)
            weights[key_of[param]] = param.detach().clone()
    masters = {}
    optimizer, ctx = trainer.optimizer, trainer.ctx
    if isinstance(optimizer, DistributedOptimizer):
        for bucket, master in zip(trainer.grads.buckets, optimizer.masters, strict=True):
            flat = torch.empty(bucket.padded)
            if ctx.dp_size > 1:
                mappings.all_gather_single(flat, master.detach(), group=ctx.dp_group)
            else:
                flat.copy_(master.detach())
            for param, start, stop in bucket.param_ranges():
                masters[key_of[param]] = flat[start:stop].view_as(param).clone()
    return weights, masters


def _train(flags: list[str], world_size: int) -> dict:
    trainer = setup(parse_run_config(SMALL + flags, world_size), log=_silent)
    losses = trainer.train()
    weights, masters = _weights_and_masters(trainer)
    return {"losses": losses, "weights": weights, "masters": masters, "skipped": trainer.skipped}


def _layout_body(rank, world_size, flags):
    return {precision: _train(flags + extra, world_size) for precision, extra in PRECISIONS.items()}


@pytest.fixture(scope="module")
def single_process():
    """Single-process losses per precision, and the measured spread of bf16/fp16 against fp32."""
    runs = {precision: _train(extra, 1) for precision, extra in PRECISIONS.items()}
    assert all(run["skipped"] == 0 for run in runs.values())
    losses = {precision: run["losses"] for precision, run in runs.items()}
    spread = {precision: _relative_gap(losses[precision], losses["fp32"]) for precision in ("bf16", "fp16")}
    print(f"\nsingle-process losses {losses}\nspread against fp32 (max relative gap over the steps): {spread}")
    return losses, spread


def _relative_gap(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def _assert_replicas_equal(results: list[dict], field: str, case: str) -> int:
    """Every global slice held by several ranks is bit-equal on all of them; returns how many were compared."""
    first: dict = {}
    compared = set()
    for rank, result in enumerate(results):
        for key, value in result[field].items():
            if key not in first:
                first[key] = (rank, value)
                continue
            compared.add(key)
            other_rank, other = first[key]
            gap = (value.float() - other.float()).abs().max().item()
            assert torch.equal(value, other), f"{case}: {field} {key} on rank {rank} differs from rank {other_rank} " \
                                              f"by up to {gap:.3g}"
    return len(compared)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_keep_replicas_bit_equal_and_track_one_process(layout, single_process):
    reference, spread = single_process
    world, flags = LAYOUTS[layout]
    ranks = run_on_ranks(_layout_body, world, flags)
    gaps = {}
    for precision in PRECISIONS:
        results = [rank[precision] for rank in ranks]
        case = f"{layout} {precision}"
        for result in results:  # every rank reports the same global loss, and no step was skipped
            assert result["losses"] == results[0]["losses"] and result["skipped"] == 0, case
        assert _assert_replicas_equal(results, "weights", case) > 0, f"{case}: no replicated parameter compared"
        if precision != "fp32":
            assert results[0]["masters"], f"{case}: no fp32 master weights"
            _assert_replicas_equal(results, "masters", case)
        losses = results[0]["losses"]
        assert torch.tensor(losses).isfinite().all(), case
        gaps[precision] = _relative_gap(losses, reference[precision])
    print(f"\n{layout}: relative gap to one process per precision {gaps}; spread of one process vs fp32 {spread}")
    assert gaps["fp32"] < 1e-5
    for precision in ("bf16", "fp16"):
        assert gaps[precision] <= spread[precision], (layout, precision, gaps, spread)

"""The grid of training runs the memory model is checked against: measured peak vs estimate per rank.

Shared by tests/memory/test_training_memory.py (which asserts the 10% bound on every cell) and
benchmarks/memory_model.py (which prints the table). A cell is a command line of tiny-model flags
and a process count; each rank builds its trainer exactly as pretrain_longctx.py does, takes one
step (so AdamW's state exists, as in every later step), then measures the peak of live tensor
bytes over the next whole step (forward, backward, optimizer) with memory.measure.PeakTracker.
"""

from __future__ import annotations

import torch

from longctx_megatron.memory.estimate import estimate_training
from longctx_megatron.memory.measure import PeakTracker
from longctx_megatron.parallel.distributed_optimizer import DistributedOptimizer
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.memory_check import training_setup
from longctx_megatron.training.setup import setup, stage_sizes, tokenizer_and_model
from tests.distributed import run_on_ranks
from tests.flags import LLAMA_ARCHITECTURE

TINY = LLAMA_ARCHITECTURE + ["--num-query-groups", "2", "--hidden-size", "128", "--num-attention-heads", "4",
                             "--attention-backend", "chunked", "--train-iters", "2", "--sliding-window", "128",
                             "--global-every", "64", "--dilated-window", "64", "--dilation", "2"]
MIXED = ["--num-layers", "4", "--attention-layout", "sliding:1,dilated:1,full:1,sliding:1"]
ONE = ["--micro-batch-size", "1", "--global-batch-size", "1"]


def _alone(kind: str, seq: int, *extra: str) -> list[str]:
    return ["--num-layers", "3", "--attention-layout", f"{kind}:3", "--seq-length", str(seq), *ONE, *extra]


# name -> (processes, flags)
CELLS = {
    "sliding+global 2K": (1, _alone("sliding", 2048)),
    "sliding 1K": (1, _alone("sliding", 1024, "--global-every", "0")),
    "dilated 1K": (1, _alone("dilated", 1024)),
    "full 2K": (1, _alone("full", 2048)),
    "mixed 256 (MLP, head)": (1, MIXED + ["--seq-length", "256", *ONE]),
    "mixed 1K bf16": (1, MIXED + ["--seq-length", "1024", *ONE, "--bf16"]),
    "mixed 1K batch 2x2": (1, MIXED + ["--seq-length", "1024", "--micro-batch-size", "2", "--global-batch-size", "4"]),
    "mixed 1K selective": (1, MIXED + ["--seq-length", "1024", *ONE, "--recompute-granularity", "selective"]),
    "mixed 1K full bf16": (1, MIXED + ["--seq-length", "1024", *ONE, "--recompute-granularity", "full", "--bf16"]),
    "mixed 1K block 2": (1, MIXED + ["--seq-length", "1024", *ONE, "--recompute-granularity", "full",
                                     "--recompute-method", "block", "--recompute-num-layers", "2"]),
    "mixed 1K dropout": (1, MIXED + ["--seq-length", "1024", *ONE, "--hidden-dropout", "0.1"]),
    "tp2 sp bf16": (2, MIXED + ["--seq-length", "1024", *ONE, "--tensor-model-parallel-size", "2",
                                "--sequence-parallel", "--bf16"]),
    "pp2 1f1b": (2, MIXED + ["--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "4",
                             "--pipeline-model-parallel-size", "2"]),
    "pp2 interleaved": (2, MIXED + ["--seq-length", "512", "--micro-batch-size", "1", "--global-batch-size", "4",
                                    "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                    "1"]),
    "cp2": (2, MIXED + ["--seq-length", "1024", *ONE, "--context-parallel-size", "2"]),
    "dp2 zero-1": (2, MIXED + ["--seq-length", "1024", "--micro-batch-size", "1", "--global-batch-size", "2",
                               "--use-distributed-optimizer"]),
}


def _persistent(trainer) -> list[torch.Tensor]:
    """What lives across steps: weights, gradient buckets, optimizer state (and ZeRO-1's masters)."""
    out = [tensor for chunk in trainer.chunks for tensor in (*chunk.parameters(), *chunk.buffers())]
    out += [bucket.buffer for bucket in trainer.grads.buckets]
    optimizer = trainer.optimizer
    if isinstance(optimizer, DistributedOptimizer):
        out += optimizer.masters + optimizer.decay_masks + optimizer.norm_weights
        out += [master.grad for master in optimizer.masters if master.grad is not None]
    for state in optimizer.optimizer.state.values():
        out += [value for value in state.values() if isinstance(value, torch.Tensor)]
    return out


def _measure_rank(rank: int, world: int, flags: list[str]) -> tuple[int, int, int, str]:
    """(pipeline rank, measured peak, estimated peak, where the estimate puts it) of this rank."""
    run = parse_run_config(TINY + flags, world)
    trainer = setup(run, log=lambda *_: None)
    trainer.step(0)
    tracker = PeakTracker()
    for value in trainer.train_data[trainer.consumed_samples].values():
        tracker.ignore(value)  # the in-memory corpus: samples are views of it
    with tracker:
        for tensor in _persistent(trainer):
            tracker.track(tensor)
        trainer.step(1)
    _, config = tokenizer_and_model(run)
    sizes, _, _ = stage_sizes(run, config)
    estimate = estimate_training(training_setup(run, config, sizes, "cpu"))[trainer.ctx.pp_rank]
    return trainer.ctx.pp_rank, tracker.peak, estimate.total, estimate.where


def measure_cell(name: str) -> list[tuple[int, int, int, str]]:
    """Every rank's (pipeline rank, measured, estimated, where) for grid cell ``name``."""
    world, flags = CELLS[name]
    return run_on_ranks(_measure_rank, world, flags, timeout=300.0)

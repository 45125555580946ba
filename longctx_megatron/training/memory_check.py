"""The memory model applied to a run: the per-rank estimate printed at start-up, and the refusal of a
run that cannot fit, before any process group or allocation (memory/estimate.py is the model)."""

from __future__ import annotations

import os

import torch

from longctx_megatron.config import ModelConfig
from longctx_megatron.memory.estimate import TrainingSetup
from longctx_megatron.memory.report import GIB, MemoryEstimate, peak_of
from longctx_megatron.training.run_config import RunConfig


def training_setup(run: RunConfig, config: ModelConfig, sizes: list[int] | None, device_type: str) -> TrainingSetup:
    """The memory model's view of ``run`` on ``device_type`` (``sizes``: layers per (virtual) stage, as
    setup.stage_sizes gives)."""
    parallel, training = run.parallel, run.training
    return TrainingSetup(
        config=config, seq_length=training.seq_length, micro_batch=training.micro_batch_size,
        microbatches=run.microbatches, element=training.dtype.itemsize,
        tensor=parallel.tensor, pipeline=parallel.pipeline, data=run.data_parallel, context=parallel.context,
        sequence_parallel=parallel.sequence_parallel, stage_sizes=tuple(sizes) if sizes else None,
        distributed_optimizer=parallel.distributed_optimizer, recompute=parallel.recompute_granularity,
        recompute_first_layers=parallel.recompute_first_layers, attention_backend=run.model.attention_backend,
        cp_comm_type=parallel.cp_comm_type,
        documents=run.data.reset_attention_mask, device_type=device_type,
    )


def describe(estimates: list[MemoryEstimate]) -> str:
    """The start-up line: each pipeline rank's estimated peak, its moment and its largest terms, and
    what the estimate leaves out."""
    parts = []
    for estimate in estimates:
        largest = ", ".join(f"{name} {size / GIB:.2f}" for name, size in estimate.largest(3))
        parts.append(f"{estimate.where}: {estimate.total / GIB:.2f} GiB ({largest})")
    notes = "".join(f"; note: {note}" for note in estimates[0].notes)
    return "memory per process (estimate, GiB): " + "; ".join(parts) + notes


def advice(estimate: MemoryEstimate, setup: TrainingSetup, run: RunConfig) -> list[str]:
    """What would shrink the largest terms of ``estimate`` and is not already in effect."""
    out = []
    states = ("weights", "gradients", "optimizer")
    activations = sum(size for name, size in estimate.terms.items() if not name.startswith(states))
    if activations > estimate.total / 2:
        if setup.recompute != "full":
            stronger = "full" if setup.recompute == "selective" else "selective (or full)"
            out.append(f"--recompute-granularity {stronger}")
        out.append("a larger --context-parallel-size or --tensor-model-parallel-size"
                   + ("" if setup.sequence_parallel else " with --sequence-parallel"))
        if setup.micro_batch > 1:
            out.append("a smaller --micro-batch-size")
    else:
        if not setup.sharded_optimizer and setup.data * setup.context > 1:
            out.append("--use-distributed-optimizer")
        out.append("a larger --tensor-model-parallel-size or --pipeline-model-parallel-size"
                   + (", or more data-parallel ranks to shard the optimizer over" if setup.sharded_optimizer else ""))
    return out


def check_fits(run: RunConfig, setup: TrainingSetup, estimates: list[MemoryEstimate],
               capacity_gib: float | None) -> None:
    """Refuse (ValueError) a run whose estimated peak on some rank exceeds ``capacity_gib``."""
    if capacity_gib is None:
        return
    worst = peak_of(estimates)
    if worst.total <= capacity_gib * GIB:
        return
    largest = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in worst.largest(3))
    notes = "".join(f" (Note: {note}.)" for note in worst.notes)
    raise ValueError(f"this run needs about {worst.total / GIB:.1f} GiB per process ({worst.where}) but "
                     f"{capacity_gib:g} GiB are available; largest terms: {largest}. Try "
                     + "; or ".join(advice(worst, setup, run))
                     + ". (python tools/estimate_memory.py with the same flags shows every term; "
                       "--memory-per-device 0 turns the check off.)" + notes)


def device_capacity_gib(run: RunConfig, device: torch.device) -> float | None:
    """--memory-per-device (0: no check), else the CUDA device's total memory, else None (no check)."""
    given = run.training.memory_per_device
    if given is not None:
        if given < 0:
            raise ValueError(f"--memory-per-device {given:g}: give the GiB each process may use "
                             "(0 turns the check off)")
        return given or None
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.cuda.get_device_properties(index).total_memory / GIB
    return None

"""The memory model against measurement: per-rank estimated vs measured peak of a training step.

    python benchmarks/memory_model.py [CELL ...]

Runs every cell of tests/memory/training_grid.py (tiny models on CPU: each layer kind alone, the
mixed plan at a length where attention dominates and one where it does not, recomputation modes,
dropout, TP2 + SP, PP2 1F1B and interleaved, CP2, ZeRO-1, fp32 and bf16) and prints, per rank, the
peak of live tensor bytes over one whole step measured by memory.measure.PeakTracker, the estimate
of memory/estimate.py, their error and the moment the estimate puts the peak at. One run per cell:
repeated runs of a cell differ by about 1% (when storage finalizers run). The test suite asserts
|error| <= 10% on the same grid. Then the inference grid (memory/inference_grid.py: each plan,
batch 1 and 4, a short and a long prompt, fp32 and bf16, through the real engine's prefill and
decode), held to the same bound by its test.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: tests/

from longctx_megatron.memory.inference_grid import inference_rows  # noqa: E402
from tests.memory.training_grid import CELLS, measure_cell  # noqa: E402


def main(names: list[str]) -> None:
    unknown = [name for name in names if name not in CELLS]
    if unknown:
        sys.exit(f"unknown cell(s) {unknown}; known: {', '.join(CELLS)}")
    print(f"{'cell':<24} {'rank':>4} {'measured MiB':>12} {'estimate MiB':>12} {'error':>7}  peak at (estimate)")
    worst, start = 0.0, time.perf_counter()
    for name in names or CELLS:
        for pipeline_rank, measured, estimated, where in measure_cell(name):
            error = (estimated - measured) / measured
            worst = max(worst, abs(error))
            moment = where.split(", at the ", 1)[-1]
            print(f"{name:<24} {'pp' + str(pipeline_rank):>4} {measured / 2**20:12.2f} {estimated / 2**20:12.2f} "
                  f"{100 * error:+6.1f}%  {moment}", flush=True)
    print(f"largest |error| {100 * worst:.1f}% ({time.perf_counter() - start:.0f} s)")
    if names:
        return
    torch.set_num_threads(1)  # the inference cells are small: threads only add contention
    print(f"\n{'inference cell':<28} {'measured MiB':>12} {'estimate MiB':>12} {'error':>7}")
    worst, start = 0.0, time.perf_counter()
    for name, estimated, measured, error in inference_rows():
        worst = max(worst, abs(error))
        print(f"{name:<28} {measured / 2**20:12.2f} {estimated / 2**20:12.2f} {100 * error:+6.1f}%")
    print(f"largest |error| {100 * worst:.1f}% ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Megatron's timers (--timing-log-level, --log-timers-to-tensorboard): named wall-clock intervals of the
training step, summed over a logging window and reported as Megatron's Timers report them.

A timer has a level; it measures only when ``--timing-log-level`` is at least that level, so level 0
costs nothing. The names and levels are Megatron's (megatron/core/timers.py and its callers):

- level 1: ``forward-backward`` (the pipeline schedule), ``all-grads-sync`` (the DP gradient reduction
  left after backward, the division, the tied-embedding and sequence-parallel norm sums),
  ``optimizer`` (everything after: the global gradient norm as ``optimizer-clip-main-grad``, zero
  counting as ``optimizer-count-zeros``, clipping and the update as ``optimizer-inner-step``);
- level 2: ``batch-generator`` (reading the micro-batches), ``forward-compute`` / ``backward-compute``
  (the model's own forward and backward passes) and ``forward-recv`` / ``backward-recv`` (waiting
  for a pipeline neighbour's activation or gradient).

At each log interval every rank's times are gathered and the log gets Megatron's block
``(min, max) time across ranks (ms):`` with one line per timer that ran, in ms per iteration;
TensorBoard gets ``<name>-time``, the maximum over ranks in seconds per iteration, as Megatron's
``Timers.write``. On CUDA a timer synchronizes the device at both ends, as Megatron's do, so it
measures the kernels and not their launch.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

# The names Megatron's training_log reports at levels >= 1 and >= 2 that this trainer has, in its order.
LEVEL_1 = ("forward-backward", "all-grads-sync", "optimizer-clip-main-grad", "optimizer-count-zeros",
           "optimizer-inner-step", "optimizer")
LEVEL_2 = ("batch-generator", "forward-compute", "backward-compute", "forward-recv", "backward-recv")


class Timers:
    """Accumulating timers enabled up to ``level`` (0: none); ``timers(name, level)`` is a context manager."""

    def __init__(self, level: int = 0, device: torch.device | None = None):
        self.level = level
        self.sync = device is not None and device.type == "cuda"
        self.device = device or torch.device("cpu")
        self.seconds: dict[str, float] = {}

    def names(self) -> tuple[str, ...]:
        """The timers reported at this level, in Megatron's order."""
        return (LEVEL_1 if self.level >= 1 else ()) + (LEVEL_2 if self.level >= 2 else ())

    @contextlib.contextmanager
    def __call__(self, name: str, level: int):
        if level > self.level:
            yield
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def min_max(self, iterations: int) -> dict[str, tuple[float, float]]:
        """{name: (min, max) over the ranks that ran it} in seconds per iteration over the last
        ``iterations`` iterations, then reset. A collective: every rank calls it at the same iteration."""
        names = self.names()
        local = torch.tensor([self.seconds.get(name, 0.0) for name in names], dtype=torch.float64)
        self.seconds = {}
        if not names:
            return {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            on_device = local.to(self.device)
            gathered = [torch.empty_like(on_device) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, on_device)
            local = torch.stack(gathered).cpu()
        else:
            local = local.unsqueeze(0)
        result = {}
        for index, name in enumerate(names):
            ran = local[:, index][local[:, index] > 0]
            if ran.numel():
                result[name] = (ran.min().item() / iterations, ran.max().item() / iterations)
        return result


def log_block(times: dict[str, tuple[float, float]]) -> str | None:
    """Megatron's ``Timers.log`` text (its default ``minmax`` option), or None when no timer ran."""
    if not times:
        return None
    return "(min, max) time across ranks (ms):" + "".join(
        "\n    {}: ({:.2f}, {:.2f})".format((name + " ").ljust(48, "."), low * 1000.0, high * 1000.0)
        for name, (low, high) in times.items())


"""Stopping cleanly: preemption signals, a wall-clock budget, an iteration interval, and runs of bad steps.

SIGTERM and SIGUSR1 (what Slurm and Kubernetes send before killing a job) only set a flag; after
the current iteration every rank learns whether any rank was signalled (one all-reduce), so all
of them save the same checkpoint and exit 0 together. ``--exit-duration-in-mins`` is agreed the
same way, since ranks' clocks start at slightly different times. Restarts after a crash need
nothing here: the launcher (``torchrun --max-restarts N``) starts the same command again and
``--load`` resumes from the newest sound checkpoint.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on (e.g. every recent step was non-finite); the message says what to do."""


class ExitConditions:
    """Decides, after each iteration, whether to save and stop, and why."""

    def __init__(self, exit_interval: int | None = None, exit_duration_mins: float | None = None,
                 device: torch.device | None = None):
        self.exit_interval, self.exit_duration_mins = exit_interval, exit_duration_mins
        self.device = device or torch.device("cpu")
        self.start = time.monotonic()
        self.signalled: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def reason(self, iteration: int) -> str | None:
        """Why to stop after ``iteration`` (the same answer on every rank), or None to go on."""
        elapsed_mins = (time.monotonic() - self.start) / 60
        flags = torch.tensor([float(self.signalled is not None),
                              float(bool(self.exit_duration_mins) and elapsed_mins >= self.exit_duration_mins)],
                             device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return f"received {self.signalled or 'a preemption signal (on another rank)'}"
        if flags[1]:
            return f"--exit-duration-in-mins {self.exit_duration_mins:g} reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval} reached"
        return None


class SkipGuard:
    """Counts non-finite (skipped) steps; too many in a row stops training with a message that names them."""

    def __init__(self, limit: int | None):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def record(self, iteration: int, finite: bool, last_saved: int | None) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.limit and self.in_a_row >= self.limit:
            first = iteration - self.in_a_row + 1
            rollback = (f"The last checkpoint is iteration {last_saved}: roll back with --ckpt-step {last_saved} and "
                        "skip or fix the data from there, or lower --lr" if last_saved is not None
                        else "No checkpoint was saved in this run.")
            raise TrainingStopped(f"iterations {first}-{iteration} all had a non-finite loss or gradient "
                                  f"norm ({self.in_a_row} in a row, --max-skipped-iters-in-a-row {self.limit}); "
                                  f"stopping without saving. {rollback}")

"""--profile: a torch.profiler trace of iterations --profile-step-start .. --profile-step-end on the
ranks of --profile-ranks, as Megatron's --profile --use-pytorch-profiler records it.

Megatron's schedule, unchanged: the profiler starts before the first iteration, ``step()`` is called
at the top of every iteration, it waits ``start - 1`` steps, warms up for one and records
``end - start``; it is stopped after iteration ``end``. The trace is written where Megatron writes
it: ``<--tensorboard-dir>/../torch_profile/rank-<global rank>.json.gz`` (Chrome trace format, readable
by chrome://tracing, Perfetto or TensorBoard's profile plugin). Megatron would write under a
directory named "None" without --tensorboard-dir; here that is refused at start-up
(``check_profile``). Megatron's --profile-ranks default is every rank; this project's flag
defaults to rank 0 (an empty list, were it given, means every rank as in Megatron).
"""

from __future__ import annotations

import os

import torch

from longctx_megatron.training.run_config import RunConfig


def check_profile(run: RunConfig) -> None:
    """Refuse --profile without --tensorboard-dir (where the trace goes), before any process group."""
    if run.logging.profile and not run.logging.tensorboard_dir:
        raise ValueError("--profile needs --tensorboard-dir: the trace is written to "
                         "<--tensorboard-dir>/../torch_profile/rank-<rank>.json.gz (as Megatron writes it)")


def trace_path(tensorboard_dir: str, rank: int) -> str:
    """Where rank ``rank``'s trace goes: Megatron's ``{tensorboard_dir}/../torch_profile/rank-{rank}.json.gz``."""
    return os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "torch_profile", f"rank-{rank}.json.gz")


class Profiler:
    """The profiler of one rank; a no-op unless --profile names this rank. ``log`` hears where the trace went."""

    def __init__(self, run: RunConfig, rank: int, log=print):
        flags = run.logging
        self.enabled = flags.profile and (not flags.profile_ranks or rank in flags.profile_ranks)
        self.end, self.prof, self.log = flags.profile_step_end, None, log
        if not self.enabled:
            return
        self.path = trace_path(flags.tensorboard_dir, rank)
        start = flags.profile_step_start
        self.prof = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                             active=flags.profile_step_end - start, repeat=1),
            on_trace_ready=self._write)

    def _write(self, prof) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        prof.export_chrome_trace(self.path)
        self.log(f"profile trace written to {self.path}")

    def begin(self) -> None:
        """Before the first iteration of the loop."""
        if self.prof is not None:
            self.prof.start()

    def step(self) -> None:
        """At the top of every iteration."""
        if self.prof is not None:
            self.prof.step()

    def after(self, done: int) -> None:
        """After iteration ``done`` (1-based): stops at --profile-step-end, as Megatron does."""
        if self.prof is not None and done == self.end:
            self.stop()

    def stop(self) -> None:
        """Stop (writing the trace if it is still recording); also when training ends before the end step."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()

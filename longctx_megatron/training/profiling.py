"""--profile: Megatron's two profilers over iterations --profile-step-start .. --profile-step-end on the
ranks of --profile-ranks (default every rank, as Megatron's empty list).

- ``--profile --use-pytorch-profiler``: a torch.profiler trace with Megatron's schedule, unchanged: the
  profiler starts before the first iteration, ``step()`` is called at the top of every iteration, it
  waits ``start - 1`` steps, warms up for one and records ``end - start``; it is stopped after iteration
  ``end``. The trace goes where Megatron writes it: ``<--tensorboard-dir>/../torch_profile/
  rank-<global rank>.json.gz`` (Chrome trace format). Megatron would write under a directory named
  "None" without --tensorboard-dir; here that is refused at start-up (``check_profile``).
- ``--profile`` alone: as in Megatron, an Nsight Systems range: ``cudaProfilerStart`` (with NVTX ranges
  for autograd) at the top of iteration ``start``, ``cudaProfilerStop`` at the top of iteration ``end``,
  for ``nsys profile --capture-range=cudaProfilerApi``. Without CUDA there is nothing to mark: the run
  says so once.
"""

from __future__ import annotations

import os

import torch

from longctx_megatron.training.run_config import RunConfig


def check_profile(run: RunConfig) -> None:
    """Refuse --profile --use-pytorch-profiler without --tensorboard-dir (where the trace goes), before any
    process group."""
    flags = run.logging
    if flags.profile and flags.use_pytorch_profiler and not flags.tensorboard_dir:
        raise ValueError("--profile --use-pytorch-profiler needs --tensorboard-dir: the trace is written to "
                         "<--tensorboard-dir>/../torch_profile/rank-<rank>.json.gz (as Megatron writes it)")


def trace_path(tensorboard_dir: str, rank: int) -> str:
    """Where rank ``rank``'s trace goes: Megatron's ``{tensorboard_dir}/../torch_profile/rank-{rank}.json.gz``."""
    return os.path.join(os.path.dirname(os.path.abspath(tensorboard_dir)), "torch_profile", f"rank-{rank}.json.gz")


class NsysRange:
    """--profile without --use-pytorch-profiler: Megatron's cudaProfilerStart/Stop range for Nsight Systems."""

    def __init__(self, run: RunConfig, device: torch.device, log=print):
        flags = run.logging
        self.start, self.end, self.nvtx, self.on = flags.profile_step_start, flags.profile_step_end, None, False
        self.cuda = device.type == "cuda"
        if not self.cuda:
            log("--profile (without --use-pytorch-profiler) marks an Nsight Systems range on CUDA, as Megatron "
                "does; there is no CUDA here, so it has no effect (add --use-pytorch-profiler for a trace)")

    def begin(self) -> None:
        pass

    def step(self, iteration: int) -> None:
        """At the top of iteration ``iteration`` (0-based, Megatron's)."""
        if not self.cuda:
            return
        if iteration == self.start and not self.on:
            torch.cuda.cudart().cudaProfilerStart()
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()
            self.on = True
        elif iteration == self.end and self.on:
            self.stop()

    def after(self, done: int) -> None:
        pass

    def stop(self) -> None:
        if self.on:
            self.nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()
            self.on = False


def build_profiler(run: RunConfig, rank: int, device: torch.device, log=print):
    """This rank's profiler for --profile: the torch trace, the Nsight range, or a no-op."""
    flags = run.logging
    if flags.profile and (not flags.profile_ranks or rank in flags.profile_ranks) and not flags.use_pytorch_profiler:
        return NsysRange(run, device, log)
    return Profiler(run, rank, log)


class Profiler:
    """The torch profiler of one rank; a no-op unless --profile --use-pytorch-profiler names this rank.
    ``log`` hears where the trace went."""

    def __init__(self, run: RunConfig, rank: int, log=print):
        flags = run.logging
        self.enabled = flags.profile and flags.use_pytorch_profiler and (
            not flags.profile_ranks or rank in flags.profile_ranks)
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

    def step(self, iteration: int) -> None:
        """At the top of every iteration (``iteration``: 0-based; the schedule counts the calls)."""
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

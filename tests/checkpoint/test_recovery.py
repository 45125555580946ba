"""Failure recovery: NaN steps, preemption signals, scheduled exits, hung ranks, and restarts under torchrun."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import pretrain_longctx
from longctx_megatron.checkpoint import layout
from longctx_megatron.parallel.state import initialize_parallel
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.recovery import TrainingStopped
from longctx_megatron.training.setup import setup
from tests.checkpoint.helpers import BASE, assert_same_tensors, tensors, train
from tests.distributed import run_on_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Poisoned(torch.utils.data.Dataset):
    """Wraps a dataset; the samples in ``bad`` get a NaN loss mask, so their loss and gradients are NaN."""

    def __init__(self, data, bad, on_read=None):
        self.data, self.bad, self.on_read = data, set(bad), on_read

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        sample = dict(self.data[index])
        if index in self.bad:
            sample["loss_mask"] = sample["loss_mask"] * float("nan")
        if self.on_read:
            self.on_read(index)
        return sample


def _trainer(flags, lines=None):
    return setup(parse_run_config(BASE + flags, 1), log=lines.append if lines is not None else print)


def test_a_poisoned_batch_is_skipped_and_training_goes_on():
    lines = []
    trainer = _trainer(["--train-iters", "5"], lines)
    trainer.train_data = Poisoned(trainer.train_data, bad={9})  # global batch 4: iteration 3 reads samples 8-11
    for iteration in range(2):
        trainer.step(iteration)
    before = [p.detach().clone() for p in trainer.chunks[0].parameters()]
    loss, norm, applied = trainer.step(2)
    assert math.isnan(loss) and not applied
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.chunks[0].parameters(), strict=True))
    trainer.iteration = 3
    losses = trainer.train()
    assert all(math.isfinite(value) for value in losses) and len(losses) == 2
    assert trainer.optimizer.steps == 4 and trainer.consumed_samples == 20
    trainer = _trainer(["--train-iters", "5"], lines)
    trainer.train_data = Poisoned(trainer.train_data, bad={9})
    losses = trainer.train()
    assert trainer.skipped == 1 and math.isnan(losses[2]) and "warning: update skipped at iteration 3" in "\n".join(
        lines)


def test_consecutive_bad_steps_stop_training_and_name_the_iterations(tmp_path):
    trainer = _trainer(["--train-iters", "10", "--max-skipped-iters-in-a-row", "3", "--save", str(tmp_path),
                        "--save-interval", "1"], [])
    trainer.train_data = Poisoned(trainer.train_data, bad=range(4, 40))  # every batch from iteration 2 on
    with pytest.raises(TrainingStopped, match=r"iterations 2-4 all had a non-finite loss or gradient norm \(3 in a "
                                              r"row, --max-skipped-iters-in-a-row 3\); stopping without saving\. The "
                                              r"last checkpoint is iteration 3"):
        trainer.train()


def test_exit_interval_and_duration_save_then_resume(tmp_path):
    root = str(tmp_path / "ckpt")
    lines = []
    losses = pretrain_longctx.run(BASE + ["--train-iters", "10", "--exit-interval", "3", "--save", root],
                                  log=lines.append)
    assert len(losses) == 3 and layout.read_tracker(root) == 3
    assert f"stopping after iteration 3: --exit-interval 3 reached; checkpoint saved in {root}" in lines
    losses = pretrain_longctx.run(BASE + ["--train-iters", "10", "--exit-duration-in-mins", "1e-9", "--save", root,
                                          "--load", root], log=lines.append)
    assert len(losses) == 1 and layout.read_tracker(root) == 4
    assert "stopping after iteration 4: --exit-duration-in-mins 1e-09 reached" in lines[-1]


def test_sigterm_finishes_the_iteration_saves_and_returns(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    lines = []
    trainer = _trainer(["--train-iters", "10", "--save", str(tmp_path)], lines)
    trainer.train_data = Poisoned(trainer.train_data, bad=(), on_read=lambda index: index == 5 and os.kill(
        os.getpid(), signal.SIGTERM))  # arrives during iteration 2
    assert len(trainer.train()) == 2 and layout.read_tracker(str(tmp_path)) == 2
    assert any("stopping after iteration 2: received SIGTERM" in line for line in lines)
    assert signal.getsignal(signal.SIGTERM) == previous


def _hang(rank, world_size):
    initialize_parallel(timeout_minutes=0.05)
    if rank == 1:
        time.sleep(6)  # a stuck rank: the other one must not wait forever
        return "slept"
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as error:  # noqa: BLE001 - the type depends on the backend
        return f"{type(error).__name__} after {time.monotonic() - start:.0f} s"
    return "no error"


def test_a_hung_rank_becomes_an_error_after_the_timeout():
    outcome, _ = run_on_ranks(_hang, 2, timeout=60)
    assert outcome != "no error" and int(outcome.split(" after ")[1].split()[0]) < 6


# ---------------------------------------------------------------- real processes under torchrun
def _torchrun(tmp_path, flags, restarts=0, log_name="log.txt"):
    log = open(tmp_path / log_name, "w")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), os.path.join(ROOT, "pretrain_longctx.py"), *BASE, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), tmp_path / log_name


def _workers(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def _wait_for(predicate, process, log, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"gave up waiting (exit {process.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_exits_0_and_resumes(tmp_path):
    root = str(tmp_path / "ckpt")
    flags = ["--train-iters", "400", "--log-interval", "1", "--save", root, "--load", root]
    process, log = _torchrun(tmp_path, flags)
    _wait_for(lambda: "iteration      3/" in log.read_text(), process, log)
    os.kill(_workers(process.pid)[-1], signal.SIGTERM)  # one rank only: the other must stop with it
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = layout.read_tracker(root)
    assert stopped is not None and 3 <= stopped < 400
    assert f"stopping after iteration {stopped}: received a preemption signal (on another rank)" in log.read_text()
    process, log = _torchrun(tmp_path, ["--train-iters", str(stopped + 2), "--save", root, "--load", root],
                             log_name="resume.txt")
    assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"resumed from {layout.iteration_dir(root, stopped)}" in log.read_text()
    assert layout.read_tracker(root) == stopped + 2


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_ends_as_if_uninterrupted(tmp_path):
    root, reference = str(tmp_path / "ckpt"), str(tmp_path / "reference")
    flags = ["--train-iters", "30", "--save-interval", "5", "--log-interval", "1"]
    process, log = _torchrun(tmp_path, flags + ["--save", root, "--load", root], restarts=1)
    _wait_for(lambda: (layout.read_tracker(root) or 0) >= 5, process, log)
    os.kill(_workers(process.pid)[0], signal.SIGKILL)
    assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed from" in text and layout.read_tracker(root) == 30
    run_on_ranks(train, 2, flags + ["--save", reference], timeout=240)
    assert_same_tensors(tensors(layout.iteration_dir(root, 30), "model/"),
                        tensors(layout.iteration_dir(reference, 30), "model/"))
    assert_same_tensors(tensors(layout.iteration_dir(root, 30), "optimizer/"),
                        tensors(layout.iteration_dir(reference, 30), "optimizer/"))

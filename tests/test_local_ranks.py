"""The multi-rank runner itself: results of any type survive the ranks' exit; failures and hangs are named."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.distributed import RankFailed, run_on_ranks


def _tensors_body(rank, world_size):
    base = torch.arange(12, dtype=torch.float32).view(3, 4) + rank
    # Views, non-contiguous tensors, low precision and nesting: each used to travel by file descriptor.
    return {"view": base[1], "transposed": base.t(), "bf16": base.to(torch.bfloat16), "nested": [base, (rank,)]}


def test_tensors_come_back_by_value_after_the_ranks_exit():
    results = run_on_ranks(_tensors_body, 3)
    for rank, result in enumerate(results):
        base = torch.arange(12, dtype=torch.float32).view(3, 4) + rank
        assert torch.equal(result["view"], base[1]) and torch.equal(result["transposed"], base.t())
        assert result["bf16"].dtype == torch.bfloat16 and torch.equal(result["bf16"].float(), base)
        assert torch.equal(result["nested"][0], base) and result["nested"][1] == (rank,)


def _failing_body(rank, world_size, how):
    if rank == 1:
        if how == "raise":
            raise ValueError("rank one is broken")
        if how == "die":
            os._exit(3)
        time.sleep(3600)
    return rank


def _arrive_slowly():
    time.sleep(3.0)  # unpickled in the rank while it starts, before the runner's ready message
    return "arrived"


class _SlowToArrive:
    """An argument that takes 3 s to unpickle in the spawned rank: start-up as slow as a loaded CI machine's."""

    def __reduce__(self):
        return _arrive_slowly, ()


def _slow_start_body(rank, world_size, argument):
    return argument, rank


def test_the_timeout_counts_from_start_up_not_from_spawn():
    # A loaded CI machine took over 5 s to spawn two ranks and import torch: that is not a hang.
    assert run_on_ranks(_slow_start_body, 2, _SlowToArrive(), timeout=2.0) == [("arrived", 0), ("arrived", 1)]


@pytest.mark.parametrize("how,error,message", [
    ("raise", RankFailed, "rank 1 of 2 failed:(.|\n)*ValueError: rank one is broken"),
    ("die", RankFailed, r"rank 1 of 2 exited \(code 3\) without a result"),
    ("hang", TimeoutError, r"ranks \[1\] of 2 did not finish within 5 s"),
])
def test_a_failing_dying_or_hanging_rank_is_named(how, error, message):
    start = time.monotonic()
    with pytest.raises(error, match=message):
        run_on_ranks(_failing_body, 2, how, timeout=5.0)
    # The hung rank is killed, not waited for: far less than its hour of sleep, however slow start-up is.
    assert time.monotonic() - start < 600

"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel pytest workers share the machine's cores: one intra-op thread each, or OpenMP
    # threads of different workers spin against each other (runs 10-20x slower on 2 cores).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_process_group_outlives_its_test():
    """A test that trains in its own process (setup() initialises torch.distributed) must not leave
    the default group to the next test on the same worker: one that creates its own would fail with
    "trying to initialize the default process group twice", depending on how xdist shared out the tests."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

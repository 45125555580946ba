"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel pytest workers share the machine's cores: one intra-op thread each, or OpenMP
    # threads of different workers spin against each other (runs 10-20x slower on 2 cores).
    torch.set_num_threads(1)

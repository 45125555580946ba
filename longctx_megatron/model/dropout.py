"""Dropout that draws its mask inside a generator context given at construction.

The context is ``contextlib.nullcontext`` (the default generator) in a plain model; the parallelizer
rebuilds the module with a per-rank stream where ranks hold different data (sequence shards), so
that ranks do not draw identical masks for different tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


class Dropout(torch.nn.Module):
    def __init__(self, p: float, rng: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__()
        self.p, self.rng = p, rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.rng():
            return F.dropout(x, self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"

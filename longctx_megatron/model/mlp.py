"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

Gate and up are separate projections (not one fused matrix) so that a tensor-parallel column split
of each is a contiguous slice of its global weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SwiGLU(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = torch.nn.Linear(d_model, d_ff, bias=False)
        self.up = torch.nn.Linear(d_model, d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

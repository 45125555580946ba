"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

Gate and up are one fused projection whose output rows are [gate; up], so the input is read (and
under tensor/sequence parallelism, communicated) once. Tensor parallelism splits each half
separately (ShardSpec parts=2), so a rank holds [gate_r; up_r] and the chunk below stays local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SwiGLU(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

Gate and up are one fused projection whose output rows are [gate; up] (``GATE_UP``, the one
definition of that layout), so the input is read (and under tensor/sequence parallelism,
communicated) once. Tensor parallelism splits each half separately (2 parts), so a rank holds
[gate_r; up_r] and the chunk below stays local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StackedRows:
    """A weight made of ``parts`` matrices of equal height stacked along the rows: [m_0; m_1; ...]."""

    parts: int

    def pack(self, *matrices: torch.Tensor) -> torch.Tensor:
        if len(matrices) != self.parts:
            raise ValueError(f"expected {self.parts} matrices to stack, got {len(matrices)}")
        return torch.cat(matrices)

    def unpack(self, stacked: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
        """The stacked matrices (rows of a weight with ``dim=0``; features of an activation with -1)."""
        return stacked.chunk(self.parts, dim=dim)


GATE_UP = StackedRows(parts=2)  # [gate; up]


class SwiGLU(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d_model, bias=False)

    def fused_weights(self) -> dict[str, StackedRows]:
        return {"gate_up": GATE_UP}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = GATE_UP.unpack(self.gate_up(x), dim=-1)
        return self.down(F.silu(gate) * up)

"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

Gate and up are one fused projection whose output rows are [gate; up] (``GATE_UP``, the one
definition of that layout), so the input is read (and under tensor/sequence parallelism,
communicated) once. Tensor parallelism splits each half separately (2 parts), so a rank holds
[gate_r; up_r] and the chunk below stays local.

``silu(gate) * up`` is one autograd function that keeps only [gate; up] for backward (as
Megatron's fused SwiGLU): autograd would also keep silu(gate), so the MLP's activations are 3 x
d_ff per token (with the product the down projection keeps) instead of 4 x d_ff (ADR 0017).
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


BACKWARD_ROWS_ELEMENTS = 1 << 22  # (token, feature) pairs per slice of _SiluProduct's backward


class _SiluProduct(torch.autograd.Function):
    """silu(gate) * up of a fused [gate; up] activation. Backward recomputes silu(gate) instead of
    keeping it and computes each gradient by the same kernels autograd would use (so the gradients are
    bitwise autograd's), walking the tokens in slices of about BACKWARD_ROWS_ELEMENTS values so that
    its temporaries stay a few MiB however long the sequence: only the gradient it returns is
    sequence-sized."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = GATE_UP.unpack(gate_up, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        width = gate_up.shape[-1] // 2
        rows, grads = gate_up.reshape(-1, 2 * width), grad.reshape(-1, width)
        out = torch.empty_like(rows)
        step = max(1, BACKWARD_ROWS_ELEMENTS // width)
        for start in range(0, rows.shape[0], step):
            piece = slice(start, start + step)
            gate, up = GATE_UP.unpack(rows[piece], dim=-1)
            upstream = grads[piece]
            out[piece, width:] = upstream * F.silu(gate)
            out[piece, :width] = torch.ops.aten.silu_backward(upstream * up, gate)
        return out.view_as(gate_up)


def silu_product(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused projection's output [gate; up] (last dimension)."""
    return _SiluProduct.apply(gate_up)


class SwiGLU(torch.nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = torch.nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = torch.nn.Linear(d_ff, d_model, bias=False)

    def fused_weights(self) -> dict[str, StackedRows]:
        return {"gate_up": GATE_UP}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_product(self.gate_up(x)))

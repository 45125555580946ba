"""Fused projections declare their layout; initialisation, tensor parallelism and conversions read it.

A fused weight stacks several matrices along its output rows (SwiGLU's [gate; up], attention's
grouped QKV). What every consumer needs to know is declared once, by the module that owns the
weight (``fused_weights()``, beside its pack/unpack helpers), never inferred from a name:

* ``parts``: how many matrices are stacked so that each must be initialised (fan-out) and split
  over tensor-parallel ranks on its own. [gate; up] has 2; grouped QKV has 1, because its rows
  are ordered by KV group, so a contiguous row slice of whole groups is already a self-contained
  set of heads.
"""

from __future__ import annotations

from typing import Protocol

import torch


class FusedLayout(Protocol):
    parts: int


def fused_layouts(model: torch.nn.Module) -> dict[str, FusedLayout]:
    """Global parameter name -> the layout its module declares, for every fused weight of ``model``."""
    out = {}
    for prefix, module in model.named_modules():
        declare = getattr(type(module), "fused_weights", None)
        for child, layout in (declare(module).items() if declare else ()):
            out[f"{prefix}.{child}.weight" if prefix else f"{child}.weight"] = layout
    return out

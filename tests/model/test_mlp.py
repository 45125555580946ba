"""SwiGLU's fused silu(gate) * up against plain autograd, and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longctx_megatron.model import mlp
from longctx_megatron.model.mlp import silu_product


def _plain(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def test_silu_product_gradcheck(monkeypatch):
    monkeypatch.setattr(mlp, "BACKWARD_ROWS_ELEMENTS", 16)  # slices of 4 of the 6 tokens
    gate_up = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_product, (gate_up,))


@pytest.mark.parametrize("slice_elements", [1 << 22, 200])  # one slice; slices of 6 tokens, the last one ragged
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_product_matches_autograd(dtype, slice_elements, monkeypatch):
    monkeypatch.setattr(mlp, "BACKWARD_ROWS_ELEMENTS", slice_elements)
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(2, 16, 64, generator=generator) * 3).to(dtype)
    upstream = torch.randn(2, 16, 32, generator=generator).to(dtype)
    ours, plain = gate_up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    out = silu_product(ours)
    out.backward(upstream)
    expected = _plain(plain)
    expected.backward(upstream)
    assert torch.equal(out, expected)  # the forward is the same ops
    assert torch.equal(ours.grad, plain.grad)  # autograd's own kernels, slice by slice


def test_silu_product_keeps_only_its_input():
    gate_up = torch.randn(4, 10, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        silu_product(gate_up)
    assert saved == [gate_up.untyped_storage().data_ptr()]

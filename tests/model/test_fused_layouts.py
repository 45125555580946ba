"""Fused weights declare their layout: the declarations name real parameters, and pack/unpack invert."""

from __future__ import annotations

import torch

from longctx_megatron.model.attention.layer import GroupedQKV
from longctx_megatron.model.build import build_model
from longctx_megatron.model.fused import fused_layouts
from longctx_megatron.model.mlp import GATE_UP
from tests.config.tiny_config import tiny


def test_declarations_name_the_fused_parameters():
    model = build_model(tiny(), device="meta")
    layouts = fused_layouts(model)
    params = dict(model.named_parameters())
    assert set(layouts) <= set(params)
    assert {name.split(".", 2)[2] for name in layouts} == {"attention.qkv.weight", "mlp.gate_up.weight"}
    assert all(layouts[f"layers.{i}.mlp.gate_up.weight"].parts == 2 for i in range(len(model.layers)))
    assert all(layouts[f"layers.{i}.attention.qkv.weight"].parts == 1 for i in range(len(model.layers)))


def test_grouped_qkv_pack_unpack_and_heads():
    group, head_dim, kv, d = 3, 4, 2, 8
    layout = GroupedQKV(group, head_dim)
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(kv * group * head_dim, d, generator=generator)
    k, v = torch.randn(2, kv * head_dim, d, generator=generator)
    fused = layout.pack(q, k, v)
    assert fused.shape == (layout.rows(kv), d)
    for got, want in zip(layout.unpack(fused), (q, k, v), strict=True):
        assert torch.equal(got, want)
    x = torch.randn(2, 5, d, generator=generator)
    heads_q, heads_k, heads_v = layout.split_heads(x @ fused.T)
    assert torch.allclose(heads_q, (x @ q.T).view(2, 5, kv * group, head_dim).transpose(1, 2), atol=1e-6)
    assert torch.allclose(heads_k, (x @ k.T).view(2, 5, kv, head_dim).transpose(1, 2), atol=1e-6)
    assert torch.allclose(heads_v, (x @ v.T).view(2, 5, kv, head_dim).transpose(1, 2), atol=1e-6)


def test_gate_up_pack_unpack():
    gate, up = torch.randn(2, 6, 4)
    fused = GATE_UP.pack(gate, up)
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(GATE_UP.unpack(fused), (gate, up), strict=True))

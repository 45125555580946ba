"""The plain decoder: forward contract, loss, initialisation, backend equivalence, QKV layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longctx_megatron.config import ModelConfig
from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.model.attention.layer import SelfAttention
from longctx_megatron.model.build import build_model
from longctx_megatron.model.fused import fused_layouts
from longctx_megatron.model.init import init_global_tensor


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97, max_seq_len=256,
        sliding_window=8, global_every=6, dilated_window=4, dilation=2,
    )
    values.update(overrides)
    return ModelConfig(**values)


def _tokens(batch=2, seq_len=29, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=generator)


def test_forward_contract():
    config = tiny_config()
    model = build_model(config)
    ids = _tokens()
    logits, loss = model(ids)
    assert logits.shape == (2, 29, 97) and loss is None
    labels = _tokens(seed=1)
    logits, loss = model(ids, labels=labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
    mask = torch.zeros(2, 29)
    mask[:, 5:9] = 1
    _, masked = model(ids, labels=labels, loss_mask=mask)
    expected = F.cross_entropy(logits[:, 5:9].flatten(0, 1), labels[:, 5:9].flatten())
    torch.testing.assert_close(masked, expected)
    default_positions, _ = model(ids, position_ids=torch.arange(29).expand(2, 29))
    torch.testing.assert_close(default_positions, logits)
    shifted, _ = model(ids, position_ids=torch.arange(29).expand(2, 29) + 3)
    assert not torch.allclose(shifted, logits)


def test_reference_and_chunked_models_agree_forward_and_backward():
    config = tiny_config()
    ids, labels = _tokens(seq_len=41), _tokens(seq_len=41, seed=3)
    results = []
    for backend in ("reference", "chunked"):
        model = build_model(config, seed=7, attention_backend=backend)
        _, loss = model(ids, labels=labels)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-5, msg=name)


def test_initialisation_depends_only_on_seed_and_name():
    config = tiny_config()
    first, second = build_model(config, seed=5), build_model(config, seed=5)
    other = build_model(config, seed=6)
    layouts = fused_layouts(first)
    for (name, a), (_, b), (_, c) in zip(
        first.named_parameters(), second.named_parameters(), other.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        parts = layouts[name].parts if name in layouts else 1
        assert torch.equal(a, init_global_tensor(name, a.shape, config, 5, parts)), name
        if a.dim() == 2:
            assert not torch.equal(a, c), name
        else:
            assert torch.equal(a, torch.ones_like(a)), name  # norm weights


@pytest.mark.parametrize("method", ["normal", "xavier", "kaiming"])
def test_init_scales(method):
    config = tiny_config(d_model=256, d_ff=512, n_layers=8, init_method=method, attention_layout="full:8")
    model = build_model(config, device="meta")
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    parts = fused_layouts(model)["layers.0.mlp.gate_up.weight"].parts  # [gate; up], as the module declares
    gate = init_global_tensor("layers.0.mlp.gate_up.weight", shapes["layers.0.mlp.gate_up.weight"], config, 0,
                              parts)[:512]
    down = init_global_tensor("layers.0.mlp.down.weight", shapes["layers.0.mlp.down.weight"], config, 0)
    fan_out, fan_in = gate.shape
    want = {"normal": 0.02, "xavier": math.sqrt(2 / (fan_in + fan_out)), "kaiming": 1 / math.sqrt(fan_in)}[method]
    assert gate.std().item() == pytest.approx(want, rel=0.03)
    down_fan_out, down_fan_in = down.shape
    base = {"normal": 0.02, "xavier": math.sqrt(2 / (down_fan_in + down_fan_out)),
            "kaiming": 1 / math.sqrt(down_fan_in)}[method]
    assert down.std().item() == pytest.approx(base / math.sqrt(2 * 8), rel=0.03)


def test_tied_and_untied_embeddings():
    tied = build_model(tiny_config())
    assert tied.output is None and tied.output_weight() is tied.embedding.weight
    untied = build_model(tiny_config(tie_embeddings=False))
    assert untied.output is not None
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 97 * 64


def test_meta_build_allocates_nothing_for_the_design_model():
    model = build_model(ModelConfig(), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 5_802_037_248


def test_bf16_model_runs():
    model = build_model(tiny_config(), dtype=torch.bfloat16)
    logits, loss = model(_tokens(), labels=_tokens(seed=1))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_only_in_training():
    model = build_model(tiny_config(hidden_dropout=0.3, attention_dropout=0.3))
    ids = _tokens()
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("kind", ["sliding", "dilated", "full"])
def test_qkv_layout_shards_by_contiguous_kv_groups(kind):
    """Row slices of whole KV groups of qkv.weight, with the matching columns of out.weight, give
    self-contained attention shards whose outputs sum to the full output: what tensor parallelism needs."""
    spec = {"sliding": LayerSpec("sliding", window=5, global_every=4),
            "dilated": LayerSpec("dilated", window=3, dilation=2), "full": LayerSpec("full")}[kind]
    d_model, n_heads, n_kv, head_dim = 32, 8, 2, 4
    torch.manual_seed(0)
    full = SelfAttention(d_model, n_heads, n_kv, spec, backend="reference")
    x = torch.randn(2, 19, d_model)
    cos, sin = full.rotary(torch.arange(19))
    want = full(x, cos, sin)
    rows_per_group = (n_heads // n_kv + 2) * head_dim
    cols_per_group = (n_heads // n_kv) * head_dim
    total = torch.zeros_like(want)
    for group in range(n_kv):
        # What a parallelizer does: same module class, projections swapped for slices of the globals.
        shard = SelfAttention(d_model, n_heads, n_kv, spec, backend="chunked", first_kv_head=group)
        shard.qkv = torch.nn.Linear(d_model, rows_per_group, bias=False)
        shard.out = torch.nn.Linear(cols_per_group, d_model, bias=False)
        with torch.no_grad():
            shard.qkv.weight.copy_(full.qkv.weight[group * rows_per_group:(group + 1) * rows_per_group])
            shard.out.weight.copy_(full.out.weight[:, group * cols_per_group:(group + 1) * cols_per_group])
        assert shard.n_kv_heads == 1
        total = total + shard(x, cos, sin)
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)

"""Parameter counts against the built model, keys_per_query against the dense mask, and FLOPs per token
against hand formulas."""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.config import LayerSpec, ModelConfig
from longctx_megatron.model.attention.patterns import (
    DilatedPattern,
    Documents,
    FullPattern,
    SlidingPattern,
    dense_mask,
    pattern_for,
)
from longctx_megatron.model.build import build_model
from longctx_megatron.model.counting import estimate_params, flops_per_token, mean_keys_per_query
from tests.config.tiny_config import tiny


def built_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in build_model(config, device="meta").parameters())


# ---------------------------------------------------------------- parameter counts


def test_design_default_parameter_count():
    config = ModelConfig()
    model = build_model(config, device="meta")
    assert estimate_params(config) == 5_802_037_248
    assert sum(p.numel() for p in model.parameters()) == 5_802_037_248
    # Shape-only: nothing was allocated.
    params = list(model.parameters())
    assert len(params) == 1 + 32 * 6 + 1  # embedding, (norm, qkv, out, norm, gate_up, down) x 32, final norm
    assert all(p.is_meta for p in params)
    assert all(p.device.type == "meta" for p in params)
    assert list(model.buffers()) == []
    assert model.output is None  # tied embeddings: the output projection is the embedding
    assert model.output_weight() is model.embedding.weight


def test_design_default_count_by_hand():
    per_layer = 4096 * (32 + 2 * 8) * 128 + 32 * 128 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert per_layer == 177_217_536
    assert 32 * per_layer + 32000 * 4096 + 4096 == 5_802_037_248
    # Untying adds one vocab x d_model output matrix.
    untied = ModelConfig(tie_embeddings=False)
    assert estimate_params(untied) == 5_802_037_248 + 32000 * 4096


TINY_CONFIGS = {
    "tied_gqa_2to1": dict(),
    "untied_gqa_2to1": dict(tie_embeddings=False),
    "gqa_4to1": dict(d_model=128, n_heads=8, n_kv_heads=2, d_ff=96, dilation=2),
    "mha_1to1": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "mqa": dict(n_heads=4, n_kv_heads=1, attention_layout="sliding:2,full:2"),
    "all_full_untied": dict(n_layers=3, attention_layout="full:3", tie_embeddings=False, vocab_size=257),
    "sliding_only": dict(n_layers=2, attention_layout="sliding:2", d_ff=200),
    "one_layer": dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48),
    "explicit": dict(
        n_layers=3,
        layers=[LayerSpec("dilated", window=4, dilation=2), LayerSpec("full"), LayerSpec("sliding", window=8)],
    ),
    "scaled_7": dict(n_layers=7, d_model=96, n_heads=6, n_kv_heads=3, d_ff=64),
}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_estimate_matches_built_model(name):
    config = tiny(**TINY_CONFIGS[name])
    assert estimate_params(config) == built_params(config)


def test_tiny_count_by_hand():
    # d=64, H=4, Hkv=2, hd=16, ff=128, V=100, L=4.
    qkv = 64 * (4 + 2 * 2) * 16
    out = 64 * 64
    mlp = 3 * 64 * 128
    per_layer = qkv + out + mlp + 2 * 64
    assert estimate_params(tiny()) == 4 * per_layer + 100 * 64 + 64 == 154_432
    assert estimate_params(tiny(tie_embeddings=False)) == 154_432 + 100 * 64


def test_count_does_not_depend_on_the_plan():
    counts = {
        estimate_params(tiny(attention_layout=layout))
        for layout in ("full:4", "sliding:4", "dilated:4", "sliding:2,dilated:1,full:1")
    }
    assert counts == {154_432}


# ---------------------------------------------------------------- keys_per_query vs the dense mask

PATTERNS = {
    "full": FullPattern(),
    "sliding_w8": SlidingPattern(8),
    "sliding_w1": SlidingPattern(1),
    "sliding_w8_g5": SlidingPattern(8, 5),
    "sliding_w4_g4": SlidingPattern(4, 4),
    "sliding_w6_g1": SlidingPattern(6, 1),
    "sliding_w16_g3": SlidingPattern(16, 3),
    "dilated_w4_r3_g2": DilatedPattern(4, 3, group_size=2),
    "dilated_w4_r3_g2_kv1": DilatedPattern(4, 3, group_size=2, first_kv_head=1),
    "dilated_w5_r2_g1_kv3": DilatedPattern(5, 2, group_size=1, first_kv_head=3),
    "dilated_w3_r4_g4_kv6": DilatedPattern(3, 4, group_size=4, first_kv_head=6),
    "dilated_w8_r1": DilatedPattern(8, 1, group_size=2),
    "dilated_w2_r8_g1_kv5": DilatedPattern(2, 8, group_size=1, first_kv_head=5),
}
N_HEADS = 8


@pytest.mark.parametrize("seq_len", [1, 3, 10, 37, 64])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_keys_per_query_equals_mask_row_sums(name, seq_len):
    pattern = PATTERNS[name]
    mask = dense_mask(pattern, seq_len, N_HEADS)
    assert mask.shape == (N_HEADS, seq_len, seq_len)
    assert mask.dtype == torch.bool
    assert not torch.triu(mask, diagonal=1).any()  # causal
    for head in range(N_HEADS):
        expected = mask[head].sum(dim=-1)
        actual = pattern.keys_per_query(seq_len, head)
        assert actual.shape == (seq_len,)
        assert torch.equal(actual, expected), (name, seq_len, head, actual.tolist(), expected.tolist())


def test_keys_per_query_known_values():
    assert FullPattern().keys_per_query(5).tolist() == [1, 2, 3, 4, 5]
    assert SlidingPattern(3).keys_per_query(6).tolist() == [1, 2, 3, 3, 3, 3]
    # Globals at 0, 4, 8: position 8 sees everything; older globals add to the window of 3.
    assert SlidingPattern(3, 4).keys_per_query(10).tolist() == [1, 2, 3, 4, 5, 4, 4, 5, 9, 5]
    # Head 0 (shift 0) sees i, i-2, i-4 (window 3); head 1 (shift 1) sees i-1, i-3, i-5.
    pattern = DilatedPattern(3, 2, group_size=1)
    assert pattern.keys_per_query(8, head=0).tolist() == [1, 1, 2, 2, 3, 3, 3, 3]
    assert pattern.keys_per_query(8, head=1).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]


def test_dilated_heads_cover_the_whole_span():
    # With n_kv_heads >= dilation the union over KV heads is every key in the span of W * r positions.
    pattern = DilatedPattern(4, 3, group_size=2)
    mask = dense_mask(pattern, 40, 6)
    union = mask.any(dim=0)
    i = torch.arange(40)[:, None]
    j = torch.arange(40)[None, :]
    assert torch.equal(union, (j <= i) & (i - j < 12))


@pytest.mark.parametrize("seq_len", [5, 33, 70])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_heads=8, n_kv_heads=4, d_model=128, dilation=4, dilated_window=5),
        dict(global_every=0, sliding_window=7),
        dict(attention_layout="dilated:2,full:2", n_kv_heads=4, dilation=3, dilated_window=6),
    ],
)
def test_mean_keys_per_query_matches_the_mask(overrides, seq_len):
    config = tiny(**overrides)
    means = mean_keys_per_query(config, seq_len)
    assert len(means) == config.n_layers
    for spec, mean in zip(config.layer_plan(), means, strict=True):
        mask = dense_mask(pattern_for(spec, config.group_size), seq_len, config.n_heads)
        expected = mask.double().sum().item() / (config.n_heads * seq_len)
        assert mean == pytest.approx(expected, rel=1e-12), (spec, seq_len)


# ---------------------------------------------------------------- FLOPs per token


def test_flops_all_full_hand_formula():
    # d=64, H=4, Hkv=2, hd=16, ff=128, V=100, L=3, untied (the output matmul is counted either way).
    config = tiny(n_layers=3, attention_layout="full:3", tie_embeddings=False)
    qkv = 64 * (4 + 2 * 2) * 16  # 8192
    out = 4 * 16 * 64  # 4096
    mlp = 3 * 64 * 128  # 24576
    matmul_params = 3 * (qkv + out + mlp) + 100 * 64  # 3 * 36864 + 6400
    assert matmul_params == 116_992
    for seq_len in (1, 2, 7, 128, 1000, 4096):
        attention = 3 * 4 * 4 * 16 * (seq_len + 1) / 2  # L * 4 * H * hd * mean keys
        expected = 3 * (2 * matmul_params + attention)
        assert flops_per_token(config, seq_len) == pytest.approx(expected, rel=1e-12)
        assert flops_per_token(config, seq_len, training=False) == pytest.approx(expected / 3, rel=1e-12)


def test_flops_design_default_at_one_token():
    config = ModelConfig()
    dense = 2 * (estimate_params(config) - 32 * 2 * 4096 - 4096)  # every matmul weight, tied output counted
    # At T=1 a sliding or full query sees its own key; in dilated layers only the KV heads with offset 0
    # (global KV heads 0 and 4 of 8, dilation 4) see it, so their mean is 2/8 keys.
    keys = 16 * 1 + 12 * 0.25 + 4 * 1
    assert mean_keys_per_query(config, 1) == [1.0] * 16 + [0.25] * 12 + [1.0] * 4
    assert flops_per_token(config, 1, training=False) == pytest.approx(dense + 4 * 32 * 128 * keys, rel=1e-12)
    assert flops_per_token(config, 1) == pytest.approx(3 * (dense + 4 * 32 * 128 * keys), rel=1e-12)


def test_flops_tied_equals_untied():
    assert flops_per_token(tiny(), 100) == flops_per_token(tiny(tie_embeddings=False), 100)


def test_sliding_flops_stop_growing():
    window, n_layers = 32, 2
    config = tiny(n_layers=n_layers, attention_layout="sliding:2", global_every=0, sliding_window=window)
    per_key = 3 * n_layers * 4 * config.n_heads * config.head_dim  # training FLOPs per visible key per token

    def mean_keys(seq_len):  # mean of min(i + 1, W) over i < T, for T >= W
        return window - window * (window - 1) / (2 * seq_len)

    f8k, f16k = flops_per_token(config, 8192), flops_per_token(config, 16384)
    delta = f16k - f8k
    assert delta == pytest.approx(per_key * (mean_keys(16384) - mean_keys(8192)), rel=1e-9)
    assert delta == pytest.approx(per_key * window * (window - 1) / 2 * (1 / 8192 - 1 / 16384), rel=1e-9)
    assert 0 < delta < 1e-4 * f8k
    # Versus full attention, whose growth is linear in T.
    full = tiny(n_layers=n_layers, attention_layout="full:2")
    full_delta = flops_per_token(full, 16384) - flops_per_token(full, 8192)
    assert full_delta == pytest.approx(per_key * 8192 / 2, rel=1e-9)
    assert full_delta > 10_000 * delta


def test_sliding_flops_below_window_equal_full_flops():
    # For T <= W a sliding layer sees exactly what a full layer sees.
    sliding = tiny(n_layers=2, attention_layout="sliding:2", global_every=0, sliding_window=32)
    full = tiny(n_layers=2, attention_layout="full:2")
    for seq_len in (1, 5, 32):
        assert flops_per_token(sliding, seq_len) == pytest.approx(flops_per_token(full, seq_len), rel=1e-12)
    assert flops_per_token(sliding, 64) < flops_per_token(full, 64)


def test_global_tokens_keep_sliding_flops_growing():
    plain = tiny(n_layers=2, attention_layout="sliding:2", global_every=0)
    with_globals = tiny(n_layers=2, attention_layout="sliding:2", global_every=8)
    grow_plain = flops_per_token(plain, 4096) - flops_per_token(plain, 2048)
    grow_globals = flops_per_token(with_globals, 4096) - flops_per_token(with_globals, 2048)
    assert grow_globals > 100 * grow_plain


def test_dilated_flops_saturate_at_window():
    # Every KV head sees W keys once T exceeds the span: mean keys -> W.
    config = tiny(n_layers=1, attention_layout="dilated:1", dilated_window=8, dilation=2)
    assert mean_keys_per_query(config, 100_000)[0] == pytest.approx(8, abs=1e-3)
    assert mean_keys_per_query(config, 100_000)[0] < 8


@pytest.mark.parametrize(
    "config",
    [
        tiny(),
        tiny(attention_layout="full:4", tie_embeddings=False),
        tiny(n_kv_heads=4, attention_layout="dilated:4", dilation=4, dilated_window=4),
        ModelConfig(n_layers=3),
    ],
    ids=["tiny", "full", "dilated", "scaled3"],
)
@pytest.mark.parametrize("seq_len", [1, 17, 256, 5000])
def test_inference_flops_are_a_third_of_training(config, seq_len):
    training = flops_per_token(config, seq_len)
    inference = flops_per_token(config, seq_len, training=False)
    assert inference > 0
    assert training == pytest.approx(3 * inference, rel=1e-12)


def test_key_counts_with_packed_documents_follow_the_dense_mask():
    """--reset-attention-mask: each document is a sequence of its own, in the FLOPs as in the kernels."""
    config = ModelConfig(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=97, max_seq_len=64,
                         sliding_window=8, global_every=4, dilated_window=4, dilation=2)
    lengths = [[10, 1, 30, 23], [64]]
    ids = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    documents = Documents(ids)
    for spec, mean in zip(config.layer_plan(), mean_keys_per_query(config, 64, lengths), strict=True):
        mask = dense_mask(pattern_for(spec, config.group_size), 64, config.n_heads, documents=documents)
        assert mean == pytest.approx(mask.sum(-1).double().mean().item())
    assert flops_per_token(config, 64, documents=lengths) < flops_per_token(config, 64)
    assert flops_per_token(config, 64, documents=[[64]]) == flops_per_token(config, 64)

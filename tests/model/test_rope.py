"""RoPE: frequencies and rotation match Hugging Face Llama; rotation invariants; dtype and meta-device safety."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.model.rope import RotaryEmbedding, apply_rotary, rope_frequencies

# (head_dim, RopeConfig) pairs covering every HF-backed scaling at a couple of sizes and factors.
HF_CASES = [
    (64, RopeConfig()),
    (128, RopeConfig(theta=500000.0)),
    (64, RopeConfig(scaling="linear", factor=2.0)),
    (128, RopeConfig(theta=1e6, scaling="linear", factor=8.0)),
    (64, RopeConfig(scaling="yarn", factor=4.0, original_max_position=2048)),
    (128, RopeConfig(theta=1e6, scaling="yarn", factor=16.0, original_max_position=4096)),
    (128, RopeConfig(scaling="yarn", factor=8.0, original_max_position=8192, beta_fast=16.0, beta_slow=2.0)),
    (64, RopeConfig(scaling="yarn", factor=1.0)),
    (128, RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192)),
    (
        64,
        RopeConfig(
            theta=10000.0,
            scaling="llama3",
            factor=32.0,
            original_max_position=4096,
            low_freq_factor=2.0,
            high_freq_factor=8.0,
        ),
    ),
]


def _case_id(case: tuple[int, RopeConfig]) -> str:
    head_dim, cfg = case
    return f"{cfg.scaling}-d{head_dim}-theta{cfg.theta:g}-f{cfg.factor:g}"


def _hf_config(cfg: RopeConfig, head_dim: int) -> transformers.LlamaConfig:
    rope_parameters: dict = {
        "rope_type": "default" if cfg.scaling == "none" else cfg.scaling,
        "rope_theta": cfg.theta,
    }
    if cfg.scaling in ("linear", "yarn", "llama3"):
        rope_parameters["factor"] = cfg.factor
    if cfg.scaling in ("yarn", "llama3"):
        rope_parameters["original_max_position_embeddings"] = cfg.original_max_position
    if cfg.scaling == "yarn":
        rope_parameters.update(beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow)
    if cfg.scaling == "llama3":
        rope_parameters.update(low_freq_factor=cfg.low_freq_factor, high_freq_factor=cfg.high_freq_factor)
    return transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=int(cfg.original_max_position * cfg.factor),
        rope_parameters=rope_parameters,
    )


def _hf_frequencies(cfg: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    hf_cfg = _hf_config(cfg, head_dim)
    if cfg.scaling == "none":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    return ROPE_INIT_FUNCTIONS[cfg.scaling](hf_cfg)


@pytest.mark.parametrize("case", HF_CASES, ids=_case_id)
def test_frequencies_match_hugging_face(case):
    head_dim, cfg = case
    inv_freq, attention_factor = rope_frequencies(cfg, head_dim)
    hf_inv_freq, hf_attention_factor = _hf_frequencies(cfg, head_dim)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (head_dim // 2,)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(hf_attention_factor, rel=1e-12)


@pytest.mark.parametrize("case", HF_CASES, ids=_case_id)
def test_cos_sin_match_hugging_face_rotary_embedding(case):
    head_dim, cfg = case
    positions = torch.stack([torch.arange(0, 3000, 7), torch.arange(5000, 8000, 7)])
    cos, sin = RotaryEmbedding(head_dim, cfg)(positions)
    hf_cos, hf_sin = LlamaRotaryEmbedding(_hf_config(cfg, head_dim))(torch.zeros(1), positions)
    assert cos.shape == sin.shape == (2, positions.shape[1], head_dim)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def test_yarn_attention_factor_formula():
    _, attention_factor = rope_frequencies(RopeConfig(scaling="yarn", factor=8.0), 64)
    assert attention_factor == pytest.approx(0.1 * math.log(8.0) + 1.0, rel=1e-12)


def test_llama3_case_covers_all_three_bands():
    # Guards the HF comparison above: the llama3 case must exercise kept, blended and divided frequencies.
    cfg = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192)
    ratio = rope_frequencies(cfg, 128)[0] / rope_frequencies(RopeConfig(theta=500000.0), 128)[0]
    assert (ratio == 1).any() and (ratio == 1 / 8).any() and ((ratio > 1 / 8) & (ratio < 1)).any()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_ntk_uses_stretched_base(head_dim, factor):
    cfg = RopeConfig(theta=10000.0, scaling="ntk", factor=factor)
    inv_freq, attention_factor = rope_frequencies(cfg, head_dim)
    base = 10000.0 * factor ** (head_dim / (head_dim - 2))
    expected = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert attention_factor == 1.0
    # NTK-aware: the highest frequency is untouched and the lowest one is divided by exactly `factor`.
    unscaled = rope_frequencies(RopeConfig(theta=10000.0), head_dim)[0]
    assert inv_freq[0] == unscaled[0] == 1.0
    torch.testing.assert_close(inv_freq[-1], unscaled[-1] / factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_linear_scaling_equals_dividing_positions(factor):
    steps = torch.arange(0, 4096)
    scaled = RotaryEmbedding(64, RopeConfig(scaling="linear", factor=float(factor)))(steps * factor)
    plain = RotaryEmbedding(64, RopeConfig())(steps)
    for got, want in zip(scaled, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [RopeConfig(), RopeConfig(scaling="yarn", factor=8.0)], ids=["none", "yarn"])
def test_apply_rotary_matches_hugging_face(cfg):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 32, 64, generator=gen)
    k = torch.randn(2, 4, 32, 64, generator=gen)
    positions = torch.randint(0, 30000, (2, 32), generator=gen)
    cos, sin = RotaryEmbedding(64, cfg)(positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [RopeConfig(), RopeConfig(scaling="yarn", factor=8.0)], ids=["none", "yarn"])
def test_rotation_preserves_norm_up_to_attention_factor(cfg):
    x = torch.randn(2, 3, 50, 128, generator=torch.Generator().manual_seed(1))
    cos, sin = RotaryEmbedding(128, cfg)(torch.arange(0, 5000, 100))
    _, attention_factor = rope_frequencies(cfg, 128)
    torch.testing.assert_close(
        apply_rotary(x, cos, sin).norm(dim=-1), attention_factor * x.norm(dim=-1), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    "cfg",
    [RopeConfig(), RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=8192)],
    ids=["none", "llama3"],
)
def test_score_depends_only_on_relative_position(cfg):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 128, generator=gen)
    k = torch.randn(1, 1, 1, 128, generator=gen)
    rope = RotaryEmbedding(128, cfg)
    scale = q.norm() * k.norm()

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(torch.tensor([m]))
        cos_n, sin_n = rope(torch.tensor([n]))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    scores_by_delta = []
    for delta in (0, 1, 5, 37, 200):
        scores = torch.stack([score(start + delta, start) for start in (0, 3, 64, 301, 1000)])
        torch.testing.assert_close(scores / scale, scores[:1].expand_as(scores) / scale, rtol=0, atol=1e-5)
        scores_by_delta.append(scores[0])
    # Non-vacuous: the score does change with the relative offset.
    assert torch.stack(scores_by_delta).std() > 1e-2 * scale


def test_bf16_input_returns_bf16():
    x = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = RotaryEmbedding(64, RopeConfig(scaling="yarn", factor=4.0))(torch.arange(16))
    x_bf16 = x.to(torch.bfloat16)
    out = apply_rotary(x_bf16, cos, sin)
    assert out.dtype == torch.bfloat16
    # Computed in float32 with a single rounding at the end.
    torch.testing.assert_close(out, apply_rotary(x_bf16.float(), cos, sin).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(out.float(), apply_rotary(x, cos, sin), rtol=1.6e-2, atol=1e-2)


def test_output_shapes_and_dtype():
    rope = RotaryEmbedding(32, RopeConfig())
    cos, sin = rope(torch.arange(10))
    assert cos.shape == sin.shape == (1, 10, 32) and cos.dtype == sin.dtype == torch.float32
    cos, sin = rope(torch.arange(30).view(3, 10))
    assert cos.shape == sin.shape == (3, 10, 32)
    # The two halves carry the same angles (rotate-half layout).
    torch.testing.assert_close(cos[..., :16], cos[..., 16:], rtol=0, atol=0)


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn", "llama3"])
def test_odd_head_dim_raises(scaling):
    cfg = RopeConfig(scaling=scaling, factor=2.0)
    with pytest.raises(ConfigError, match="head_dim=63"):
        rope_frequencies(cfg, 63)
    with pytest.raises(ConfigError, match="head_dim=63"):
        RotaryEmbedding(63, cfg)


def test_built_on_meta_device_works_on_cpu():
    cfg = RopeConfig(scaling="yarn", factor=4.0)
    with torch.device("meta"):
        rope = RotaryEmbedding(64, cfg)
    assert list(rope.parameters()) == [] and list(rope.buffers()) == []
    rope.to_empty(device="cpu")
    positions = torch.arange(100)
    cos, sin = rope(positions)
    assert cos.device.type == "cpu" and sin.device.type == "cpu"
    ref_cos, ref_sin = RotaryEmbedding(64, cfg)(positions)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=0)
    assert "head_dim=64" in repr(rope) and "scaling=yarn" in repr(rope)

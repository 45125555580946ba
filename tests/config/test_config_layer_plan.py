"""The layer plan: the design default, its proportional scaling, compact strings, explicit per-layer lists
and per-kind / per-layer RoPE."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from longctx_megatron.config import LayerSpec, ModelConfig, RopeConfig
from longctx_megatron.config.layer_plan import DEFAULT_LAYOUT, parse_layout, scale_layout
from longctx_megatron.model.build import build_model
from tests.config.tiny_config import TINY_SHAPE as TINY

LLAMA3 = RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, original_max_position=64)
YARN = RopeConfig(scaling="yarn", factor=4.0, original_max_position=64, beta_fast=16.0, beta_slow=2.0)


def runs(plan: list[LayerSpec]) -> list[tuple[str, int]]:
    """Consecutive (kind, count) runs of a plan."""
    return [(kind, len(list(group))) for kind, group in itertools.groupby(spec.kind for spec in plan)]


# ---------------------------------------------------------------- the design default


def test_default_plan_is_the_design_stack():
    plan = ModelConfig().layer_plan()
    assert len(plan) == 32
    assert plan[:16] == [LayerSpec("sliding", window=4096, global_every=128, rope=RopeConfig())] * 16
    assert plan[16:28] == [LayerSpec("dilated", window=1024, dilation=4, rope=RopeConfig())] * 12
    assert plan[28:] == [LayerSpec("full", rope=RopeConfig())] * 4
    assert runs(plan) == [("sliding", 16), ("dilated", 12), ("full", 4)]
    assert all(spec.rope == RopeConfig() for spec in plan)
    assert plan[0].describe() == "sliding(window=4096, global every 128)"
    assert plan[16].describe() == "dilated(window=1024, dilation=4)"
    assert plan[31].describe() == "full"


def test_default_layout_constant_and_identity_scaling():
    assert DEFAULT_LAYOUT == (("sliding", 16), ("dilated", 12), ("full", 4))
    assert scale_layout(DEFAULT_LAYOUT, 32) == [("sliding", 16), ("dilated", 12), ("full", 4)]


def test_default_model_config_sizes():
    config = ModelConfig()
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (4096, 32, 32, 8)
    assert (config.d_ff, config.vocab_size, config.max_seq_len) == (11008, 32000, 102400)
    assert (config.head_dim, config.group_size) == (128, 4)


# ---------------------------------------------------------------- proportional scaling


@pytest.mark.parametrize(
    ("n_layers", "expected"),
    [
        (1, [("sliding", 1)]),
        (2, [("sliding", 1), ("dilated", 1)]),
        (3, [("sliding", 1), ("dilated", 1), ("full", 1)]),
        (4, [("sliding", 2), ("dilated", 1), ("full", 1)]),
        (8, [("sliding", 4), ("dilated", 3), ("full", 1)]),
        (16, [("sliding", 8), ("dilated", 6), ("full", 2)]),
        (32, [("sliding", 16), ("dilated", 12), ("full", 4)]),
        (64, [("sliding", 32), ("dilated", 24), ("full", 8)]),
    ],
)
def test_scaled_default_exact_values(n_layers, expected):
    assert scale_layout(DEFAULT_LAYOUT, n_layers) == expected
    assert runs(ModelConfig(n_layers=n_layers).layer_plan()) == expected


@pytest.mark.parametrize("n_layers", range(1, 41))
def test_scaled_default_keeps_sum_order_and_every_kind(n_layers):
    layout = scale_layout(DEFAULT_LAYOUT, n_layers)
    kinds = [kind for kind, _ in layout]
    counts = [count for _, count in layout]
    assert sum(counts) == n_layers
    assert all(count >= 1 for count in counts)
    assert kinds == ["sliding", "dilated", "full"][: len(kinds)]  # design order, no kind repeated
    if n_layers >= 3:
        assert kinds == ["sliding", "dilated", "full"]
        # Proportional: each count is within one layer of its exact share (16:12:4 of 32).
        for count, share in zip(counts, (16, 12, 4), strict=True):
            assert abs(count - share * n_layers / 32) < 1, (n_layers, layout)
    else:
        assert len(kinds) == n_layers
    # The resolved plan follows the layout, with the config's windows.
    plan = ModelConfig(n_layers=n_layers).layer_plan()
    assert runs(plan) == layout
    assert len(plan) == n_layers


def test_scaled_plan_uses_config_windows():
    plan = ModelConfig(n_layers=4, **TINY).layer_plan()
    assert plan == [
        LayerSpec("sliding", window=32, global_every=8, rope=RopeConfig()),
        LayerSpec("sliding", window=32, global_every=8, rope=RopeConfig()),
        LayerSpec("dilated", window=8, dilation=2, rope=RopeConfig()),
        LayerSpec("full", rope=RopeConfig()),
    ]


@pytest.mark.parametrize(
    ("layout", "n_layers", "expected"),
    [
        # Floors plus the at-least-one rule overshoot: the surplus comes off the over-rounded kind.
        ((("sliding", 30), ("dilated", 1), ("full", 1)), 4, [("sliding", 2), ("dilated", 1), ("full", 1)]),
        ((("sliding", 30), ("dilated", 1), ("full", 1)), 3, [("sliding", 1), ("dilated", 1), ("full", 1)]),
        # Equal remainders: the earlier kind gets the extra layer.
        ((("full", 1), ("sliding", 1)), 3, [("full", 2), ("sliding", 1)]),
        ((("dilated", 1), ("full", 1), ("sliding", 1)), 4, [("dilated", 2), ("full", 1), ("sliding", 1)]),
        ((("full", 1), ("sliding", 1)), 1, [("full", 1)]),
        ((("full", 3),), 5, [("full", 5)]),
    ],
)
def test_scale_layout_custom_layouts(layout, n_layers, expected):
    assert scale_layout(layout, n_layers) == expected


# ---------------------------------------------------------------- compact strings


def test_compact_layout_with_custom_windows():
    config = ModelConfig(
        n_layers=4,
        **{**TINY, "sliding_window": 16, "global_every": 0, "dilated_window": 4, "dilation": 2},
        attention_layout="sliding:2,dilated:1,full:1",
    )
    assert config.layer_plan() == [
        LayerSpec("sliding", window=16, global_every=0, rope=RopeConfig()),
        LayerSpec("sliding", window=16, global_every=0, rope=RopeConfig()),
        LayerSpec("dilated", window=4, dilation=2, rope=RopeConfig()),
        LayerSpec("full", rope=RopeConfig()),
    ]
    assert [spec.describe() for spec in config.layer_plan()] == [
        "sliding(window=16)",
        "sliding(window=16)",
        "dilated(window=4, dilation=2)",
        "full",
    ]


def test_compact_layout_keeps_written_order_and_repeats():
    config = ModelConfig(n_layers=6, **TINY, attention_layout="full:1,sliding:2,full:1,dilated:2")
    assert [spec.kind for spec in config.layer_plan()] == ["full", "sliding", "sliding", "full", "dilated", "dilated"]


def test_compact_layout_is_not_rescaled():
    # The compact string is taken literally: with n_layers=32 it is not scaled like the default.
    config = ModelConfig(n_layers=4, **TINY, attention_layout="full:4")
    assert config.layer_plan() == [LayerSpec("full", rope=RopeConfig())] * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sliding:16,dilated:12,full:4", [("sliding", 16), ("dilated", 12), ("full", 4)]),
        (" sliding : 2 , full:2 ", [("sliding", 2), ("full", 2)]),
        ("full:1", [("full", 1)]),
        ("dilated:3,dilated:1", [("dilated", 3), ("dilated", 1)]),
        ("sliding:007", [("sliding", 7)]),
    ],
)
def test_parse_layout(text, expected):
    assert parse_layout(text) == expected


# ---------------------------------------------------------------- explicit per-layer lists


def _explicit_config() -> ModelConfig:
    return ModelConfig(
        n_layers=5,
        **TINY,
        layers=[
            {"kind": "sliding", "window": 16, "global_every": 4},
            LayerSpec("sliding", window=64),
            {"kind": "dilated", "window": 8, "dilation": 2},
            {
                "kind": "full",
                "rope": {"theta": 500000.0, "scaling": "llama3", "factor": 8.0, "original_max_position": 64},
            },
            LayerSpec("full", rope=LLAMA3),
        ],
    )


def test_explicit_layers_are_the_plan():
    config = _explicit_config()
    plan = config.layer_plan()
    assert plan == [
        LayerSpec("sliding", window=16, global_every=4, rope=RopeConfig()),
        LayerSpec("sliding", window=64, rope=RopeConfig()),
        LayerSpec("dilated", window=8, dilation=2, rope=RopeConfig()),
        LayerSpec("full", rope=LLAMA3),
        LayerSpec("full", rope=LLAMA3),
    ]
    assert all(isinstance(spec, LayerSpec) for spec in config.layers)
    # Per-layer windows win over the config-level sliding_window / dilated_window.
    assert [spec.window for spec in plan] == [16, 64, 8, 0, 0]
    assert [spec.rope.scaling for spec in plan] == ["none", "none", "none", "llama3", "llama3"]
    # layer_plan() returns a copy: mutating it does not change the config.
    plan.pop()
    assert len(config.layer_plan()) == 5


def test_explicit_layers_reach_the_model():
    config = _explicit_config()
    model = build_model(config, device="meta")
    assert [layer.attention.spec for layer in model.layers] == config.layer_plan()
    assert [layer.attention.rotary.cfg for layer in model.layers] == [
        RopeConfig(),
        RopeConfig(),
        RopeConfig(),
        LLAMA3,
        LLAMA3,
    ]
    assert [layer.attention.pattern.kind for layer in model.layers] == [
        "sliding",
        "sliding",
        "dilated",
        "full",
        "full",
    ]
    assert model.layers[2].attention.pattern.group_size == 2


# ---------------------------------------------------------------- rope_by_kind


def test_rope_by_kind_overrides_the_default_rope_per_kind():
    base = RopeConfig(theta=250000.0)
    config = ModelConfig(
        n_layers=4,
        **TINY,
        rope=base,
        rope_by_kind={"full": LLAMA3, "dilated": dataclasses.asdict(YARN)},  # a dict is converted
    )
    assert config.rope_by_kind == {"full": LLAMA3, "dilated": YARN}
    assert [spec.rope for spec in config.layer_plan()] == [base, base, YARN, LLAMA3]


def test_rope_dict_becomes_rope_config():
    config = ModelConfig(n_layers=4, **TINY, rope={"theta": 500000.0})
    assert config.rope == RopeConfig(theta=500000.0)
    assert all(spec.rope.theta == 500000.0 for spec in config.layer_plan())


def test_rope_by_kind_with_compact_layout():
    config = ModelConfig(n_layers=3, **TINY, attention_layout="full:1,sliding:2", rope_by_kind={"sliding": LLAMA3})
    assert [(spec.kind, spec.rope) for spec in config.layer_plan()] == [
        ("full", RopeConfig()),
        ("sliding", LLAMA3),
        ("sliding", LLAMA3),
    ]


def test_layers_sharing_a_rope_share_one_table_key():
    # The model computes one cos/sin table per distinct RopeConfig: equal configs must hash equal.
    config = ModelConfig(n_layers=4, **TINY, rope_by_kind={"full": LLAMA3, "dilated": LLAMA3})
    assert len({spec.rope for spec in config.layer_plan()}) == 2


def test_explicit_layers_without_rope_inherit_config_rope():
    base = RopeConfig(theta=500000.0)
    config = ModelConfig(
        n_layers=2,
        **TINY,
        rope=base,
        rope_by_kind={"full": LLAMA3},
        layers=[{"kind": "sliding", "window": 16}, {"kind": "full"}],
    )
    assert [spec.rope for spec in config.layer_plan()] == [base, LLAMA3]

"""Every validation rule of ModelConfig, LayerSpec, RopeConfig and parse_layout: one failing case each,
with a message that names the offending field, plus tiny configs that pass."""

from __future__ import annotations

import re

import pytest

from longctx_megatron.config import ATTENTION_KINDS, ConfigError, LayerSpec, ModelConfig, RopeConfig
from longctx_megatron.config.layer_plan import parse_layout
from tests.config.tiny_config import tiny

# 4 layers -> default plan sliding, sliding, dilated, full (indices 0, 1, 2, 3).


def _rope_bypassing_validation(**fields) -> RopeConfig:
    """A RopeConfig whose fields were changed after construction (its own __post_init__ check skipped)."""
    rope = RopeConfig()
    for name, value in fields.items():
        object.__setattr__(rope, name, value)
    return rope


# ---------------------------------------------------------------- passing configs


def test_tiny_config_passes_and_resolves_its_plan():
    config = tiny()
    assert config.head_dim == 16
    assert config.group_size == 2
    assert [spec.describe() for spec in config.layer_plan()] == [
        "sliding(window=32, global every 8)",
        "sliding(window=32, global every 8)",
        "dilated(window=8, dilation=2)",
        "full",
    ]
    config.validate()  # idempotent: validating again raises nothing
    assert config.n_layers == 4


def test_boundary_values_pass():
    # Dropouts at both ends of [0, 1], a window equal to max_seq_len, a dilated span equal to
    # max_seq_len, dilation == n_kv_heads, factor < 1 allowed when scaling is "none".
    config = tiny(
        hidden_dropout=1.0,
        attention_dropout=0.0,
        sliding_window=256,
        dilated_window=128,
        dilation=2,
        global_every=0,
        rope=RopeConfig(factor=0.5),
    )
    spans = [(s.kind, s.window, s.dilation) for s in config.layer_plan()]
    assert spans == [("sliding", 256, 1), ("sliding", 256, 1), ("dilated", 128, 2), ("full", 0, 1)]
    assert config.rope.factor == 0.5


@pytest.mark.parametrize("init_method", ["normal", "xavier", "kaiming"])
def test_every_known_init_method_passes(init_method):
    assert tiny(init_method=init_method).init_method == init_method


# ---------------------------------------------------------------- ModelConfig.validate


POSITIVE_INT_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len")


@pytest.mark.parametrize("name", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [0, -4])
def test_size_fields_must_be_positive(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}={value} must be a positive integer$"):
        tiny(**{name: value})


@pytest.mark.parametrize("name", POSITIVE_INT_FIELDS)
@pytest.mark.parametrize("value", [64.0, "64", None])
def test_size_fields_must_be_integers(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}={re.escape(repr(value))} must be a positive integer$"):
        tiny(**{name: value})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            dict(d_model=66, n_heads=4),
            "d_model=66 must be divisible by n_heads=4 (head_dim would be 16.5); change d_model or n_heads",
        ),
        (dict(d_model=64, n_heads=6, n_kv_heads=2), "d_model=64 must be divisible by n_heads=6"),
        (
            dict(n_heads=4, n_kv_heads=3),
            "n_heads=4 must be divisible by n_kv_heads=3 (each KV head serves a whole group of query heads); "
            "choose n_kv_heads among [1, 2, 4]",
        ),
        (dict(d_model=96, n_heads=12, n_kv_heads=5), "choose n_kv_heads among [1, 2, 3, 4, 6, 12]"),
        (
            dict(d_model=60, n_heads=4, n_kv_heads=2),
            "head_dim = d_model/n_heads = 15 must be even for RoPE; change d_model or n_heads",
        ),
        (dict(d_model=4, n_heads=4, n_kv_heads=2), "head_dim = d_model/n_heads = 1 must be even"),
        (dict(hidden_dropout=-0.1), "hidden_dropout=-0.1 must be in [0, 1]"),
        (dict(hidden_dropout=1.5), "hidden_dropout=1.5 must be in [0, 1]"),
        (dict(hidden_dropout=float("nan")), "hidden_dropout=nan must be a finite number"),
        (dict(attention_dropout=1.01), "attention_dropout=1.01 must be in [0, 1]"),
        (dict(attention_dropout=-1.0), "attention_dropout=-1.0 must be in [0, 1]"),
        (dict(init_method="uniform"), "init_method='uniform' is unknown; choose one of normal, xavier, kaiming"),
        (dict(init_method="Normal"), "init_method='Normal' is unknown"),
        (dict(init_std=0.0), "init_std=0.0 must be > 0"),
        (dict(init_std=-0.02), "init_std=-0.02 must be > 0"),
        (dict(norm_eps=0.0), "norm_eps=0.0 must be > 0"),
        (dict(norm_eps=-1e-5), "norm_eps=-1e-05 must be > 0"),
        (
            dict(attention_layout="full:4", layers=[LayerSpec("full")] * 4),
            "give either attention_layout or layers, not both (layers is the explicit plan)",
        ),
        (
            dict(rope_by_kind={"local": RopeConfig()}),
            "rope_by_kind has unknown attention kind 'local'; known: sliding, dilated, full",
        ),
        (
            dict(attention_layout="sliding:2,full:1"),
            "the layer plan has 3 layers but n_layers=4; make the attention_layout counts (or the layers list) "
            "add up to n_layers",
        ),
        (dict(attention_layout="sliding:3,dilated:1,full:1"), "the layer plan has 5 layers but n_layers=4"),
        (dict(layers=[LayerSpec("full"), LayerSpec("full")]), "the layer plan has 2 layers but n_layers=4"),
        (dict(layers=[]), "the layer plan has 0 layers but n_layers=4"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 40 else None,
)
def test_model_config_rules(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(**overrides)


def test_size_checks_run_before_divisibility_checks():
    # n_heads=0 would make the divisibility check divide by zero; it must be reported as a size error.
    with pytest.raises(ConfigError, match=r"^n_heads=0 must be a positive integer$"):
        tiny(n_heads=0)
    with pytest.raises(ConfigError, match=r"^n_kv_heads=0 must be a positive integer$"):
        tiny(n_kv_heads=0)


def test_validate_rechecks_after_mutation():
    config = tiny()
    config.n_kv_heads = 3
    with pytest.raises(ConfigError, match=re.escape("n_heads=4 must be divisible by n_kv_heads=3")):
        config.validate()


# ---------------------------------------------------------------- ModelConfig._validate_layer


def _explicit(*specs: LayerSpec, **overrides) -> ModelConfig:
    return tiny(n_layers=len(specs), layers=list(specs), **overrides)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: tiny(sliding_window=0), "layer 0 (sliding): window=0 must be > 0 (set sliding_window)"),
        (lambda: tiny(sliding_window=-8), "layer 0 (sliding): window=-8 must be > 0 (set sliding_window)"),
        (lambda: tiny(dilated_window=0), "layer 2 (dilated): window=0 must be > 0 (set dilated_window)"),
        (
            lambda: _explicit(LayerSpec("full"), LayerSpec("dilated", window=-1, dilation=2)),
            "layer 1 (dilated): window=-1 must be > 0 (set dilated_window)",
        ),
        (
            lambda: tiny(sliding_window=257),
            "layer 0 (sliding): sliding_window=257 exceeds max_seq_len=256; use a full layer or a smaller window",
        ),
        (
            lambda: tiny(global_every=-1),
            "layer 0 (sliding): global_every=-1 must be >= 0 (0 = no global tokens)",
        ),
        (
            lambda: _explicit(LayerSpec("sliding", window=16, dilation=2)),
            "layer 0 (sliding): dilation=2 applies to dilated layers only",
        ),
        (
            lambda: _explicit(LayerSpec("sliding", window=16, dilation=0)),
            "layer 0 (sliding): dilation=0 applies to dilated layers only",
        ),
        (lambda: tiny(dilation=0), "layer 2 (dilated): dilation=0 must be >= 1"),
        (lambda: tiny(dilation=-2), "layer 2 (dilated): dilation=-2 must be >= 1"),
        (
            lambda: _explicit(
                LayerSpec("full"), LayerSpec("full"), LayerSpec("dilated", 8, global_every=4, dilation=2)
            ),
            "layer 2 (dilated): global_every applies to sliding layers only",
        ),
        (
            lambda: tiny(dilated_window=129, dilation=2),
            "layer 2 (dilated): dilated span window*dilation = 129*2 = 258 exceeds max_seq_len=256; "
            "shrink dilated_window or dilation",
        ),
        (
            lambda: tiny(dilation=4),
            "layer 2 (dilated): dilation=4 needs n_kv_heads >= dilation so that the heads' offsets cover every "
            "residue mod 4 (n_kv_heads=2); lower dilation or raise n_kv_heads",
        ),
        (
            lambda: tiny(n_kv_heads=1, dilation=2),
            "layer 2 (dilated): dilation=2 needs n_kv_heads >= dilation",
        ),
        (
            lambda: tiny(n_layers=1, layers=[{"kind": "full", "rope": {"scaling": "bogus"}}]),
            "layers[0].rope: rope.scaling='bogus' is unknown",
        ),
        (
            lambda: tiny(n_layers=1, layers=[{"kind": "full", "rope": {"theta": 0.0}}]),
            "layers[0].rope: rope.theta=0.0 must be > 0",
        ),
        (
            lambda: tiny(rope=RopeConfig(scaling="ntk", factor=2.0), d_model=8, n_heads=4),
            "layer 0 (sliding): ntk RoPE scaling needs head_dim > 2 (head_dim=2)",
        ),
    ],
)
def test_layer_rules(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_full_layers_ignore_window_fields():
    # A full layer's window/global_every/dilation are not read, so they are not validated.
    config = _explicit(LayerSpec("full", window=-5, global_every=-1, dilation=0))
    assert config.layer_plan()[0].describe() == "full"


def test_sliding_window_checked_against_max_seq_len_only_for_sliding_layers():
    # All-full plan: the (unused) sliding_window may exceed max_seq_len.
    config = tiny(attention_layout="full:4", sliding_window=10_000)
    assert [spec.kind for spec in config.layer_plan()] == ["full"] * 4


# ---------------------------------------------------------------- RopeConfig.validate


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(scaling="dynamic"), "rope.scaling='dynamic' is unknown; choose one of none, linear, ntk, yarn, llama3"),
        (dict(scaling="Linear"), "rope.scaling='Linear' is unknown"),
        (dict(theta=0.0), "rope.theta=0.0 must be > 0 (10000 is the usual base)"),
        (dict(theta=-10000.0), "rope.theta=-10000.0 must be > 0"),
        (
            dict(scaling="linear", factor=0.5),
            "rope.factor=0.5 must be >= 1 for linear scaling (it is the context-length multiplier)",
        ),
        (dict(scaling="ntk", factor=0.0), "rope.factor=0.0 must be >= 1 for ntk scaling"),
        (dict(scaling="yarn", factor=0.9), "rope.factor=0.9 must be >= 1 for yarn scaling"),
        (dict(scaling="llama3", factor=0.25), "rope.factor=0.25 must be >= 1 for llama3 scaling"),
        (dict(original_max_position=0), "rope.original_max_position=0 must be > 0"),
        (dict(scaling="yarn", factor=2.0, original_max_position=-1), "rope.original_max_position=-1 must be > 0"),
        (
            dict(scaling="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0),
            "rope: llama3 scaling needs high_freq_factor (4.0) > low_freq_factor (4.0) > 0",
        ),
        (
            dict(scaling="llama3", factor=8.0, low_freq_factor=8.0, high_freq_factor=4.0),
            "rope: llama3 scaling needs high_freq_factor (4.0) > low_freq_factor (8.0) > 0",
        ),
        (
            dict(scaling="llama3", factor=8.0, low_freq_factor=0.0),
            "rope: llama3 scaling needs high_freq_factor (4.0) > low_freq_factor (0.0) > 0",
        ),
        (
            dict(scaling="yarn", factor=4.0, beta_fast=1.0, beta_slow=1.0),
            "rope: yarn scaling needs beta_fast (1.0) > beta_slow (1.0) > 0",
        ),
        (
            dict(scaling="yarn", factor=4.0, beta_fast=32.0, beta_slow=0.0),
            "rope: yarn scaling needs beta_fast (32.0) > beta_slow (0.0) > 0",
        ),
    ],
)
def test_rope_rules(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RopeConfig(**fields)


def test_rope_validate_prefixes_the_given_location():
    rope = _rope_bypassing_validation(theta=-1.0)
    with pytest.raises(ConfigError, match=re.escape("layer 7 (full) rope.theta=-1.0 must be > 0")):
        rope.validate("layer 7 (full) rope")


@pytest.mark.parametrize(
    "fields",
    [
        dict(scaling="none", factor=0.5, low_freq_factor=9.0, beta_slow=99.0),  # unchecked without scaling
        dict(scaling="linear", factor=1.0),
        dict(scaling="ntk", factor=2.0),
        dict(scaling="yarn", factor=1.0),
        dict(scaling="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0),
        dict(scaling="llama3", factor=1.0, low_freq_factor=9.0, high_freq_factor=10.0, beta_fast=0.0),
    ],
)
def test_valid_rope_configs_pass(fields):
    rope = RopeConfig(**fields)
    assert {name: getattr(rope, name) for name in fields} == fields


@pytest.mark.parametrize(
    ("where", "rope", "message"),
    [
        ("rope", {"scaling": "bogus"}, "rope.scaling='bogus' is unknown"),
        ("rope_by_kind", {"full": {"theta": 0.0}}, "rope.theta=0.0 must be > 0"),
        ("rope_by_kind", {"sliding": {"scaling": "yarn", "factor": 4.0, "beta_slow": 40.0}}, "beta_fast (32.0)"),
    ],
)
def test_model_config_converts_and_validates_rope_dicts(where, rope, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(**{where: rope})


# ---------------------------------------------------------------- LayerSpec.__post_init__


@pytest.mark.parametrize("kind", ["global", "Full", "", "local", "dense"])
def test_layer_spec_rejects_unknown_kinds(kind):
    message = f"unknown attention kind {kind!r}; known kinds: sliding, dilated, full"
    with pytest.raises(ConfigError, match=re.escape(message)):
        LayerSpec(kind)


def test_layer_spec_unknown_kind_from_layers_dicts():
    with pytest.raises(ConfigError, match=re.escape("unknown attention kind 'mamba'; known kinds: sliding")):
        tiny(n_layers=2, layers=[{"kind": "full"}, {"kind": "mamba"}])


def test_layer_spec_converts_rope_dict_and_validates_it():
    spec = LayerSpec("full", rope={"theta": 500000.0, "scaling": "linear", "factor": 2.0})
    assert spec.rope == RopeConfig(theta=500000.0, scaling="linear", factor=2.0)
    assert isinstance(spec.rope, RopeConfig)
    with pytest.raises(ConfigError, match=re.escape("rope.factor=0.5 must be >= 1 for linear scaling")):
        LayerSpec("full", rope={"scaling": "linear", "factor": 0.5})


def test_attention_kinds_constant():
    assert ATTENTION_KINDS == ("sliding", "dilated", "full")


# ---------------------------------------------------------------- parse_layout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "global:2",
            "attention_layout='global:2': unknown attention kind 'global'; known kinds: sliding, dilated, full",
        ),
        ("sliding:2,Full:2", "attention_layout='sliding:2,Full:2': unknown attention kind 'Full'"),
        ("", "attention_layout='': unknown attention kind ''; known kinds: sliding, dilated, full"),
        ("sliding:2,", "attention_layout='sliding:2,': unknown attention kind ''"),
        ("sliding:2,,full:2", "attention_layout='sliding:2,,full:2': unknown attention kind ''"),
        ("sliding=2", "attention_layout='sliding=2': unknown attention kind 'sliding=2'"),
        ("sliding", "attention_layout='sliding': 'sliding' needs a positive layer count, e.g. 'sliding:4'"),
        ("sliding:", "attention_layout='sliding:': 'sliding:' needs a positive layer count, e.g. 'sliding:4'"),
        ("full:0", "attention_layout='full:0': 'full:0' needs a positive layer count, e.g. 'full:4'"),
        ("dilated:-1", "attention_layout='dilated:-1': 'dilated:-1' needs a positive layer count, e.g. 'dilated:4'"),
        ("sliding:1.5", "'sliding:1.5' needs a positive layer count"),
        ("sliding:2,full:x", "attention_layout='sliding:2,full:x': 'full:x' needs a positive layer count"),
        ("sliding:2:3", "'sliding:2:3' needs a positive layer count"),
    ],
)
def test_parse_layout_errors(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_layout(text)


def test_layout_errors_surface_through_model_config():
    with pytest.raises(ConfigError, match=re.escape("attention_layout='sliding:2,local:2': unknown attention kind")):
        tiny(attention_layout="sliding:2,local:2")
    with pytest.raises(ConfigError, match=re.escape("attention_layout='full:four': 'full:four' needs a positive")):
        tiny(attention_layout="full:four")


# ---------------------------------------------------------------- known validation gaps (bugs)


def test_parse_layout_non_ascii_digit_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape("attention_layout='sliding:²'")):
        parse_layout("sliding:²")


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: tiny(init_std=float("nan")), "init_std"),
        (lambda: tiny(norm_eps=float("nan")), "norm_eps"),
        (lambda: RopeConfig(theta=float("nan")), "theta"),
    ],
)
def test_nan_values_are_rejected(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


def test_ntk_with_head_dim_2_is_rejected_at_construction():
    with pytest.raises(ConfigError, match="head_dim"):
        tiny(d_model=8, n_heads=4, n_kv_heads=2, rope=RopeConfig(scaling="ntk", factor=2.0))


@pytest.mark.parametrize("field", ["d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"])
def test_sizes_that_cannot_be_real_are_refused_before_anything_is_built(field):
    from longctx_megatron.config.model_config import SIZE_LIMITS

    with pytest.raises(ConfigError, match=f"{field}={SIZE_LIMITS[field] + 1} exceeds {SIZE_LIMITS[field]:,}"):
        tiny(**{field: SIZE_LIMITS[field] + 1})


# ---------------------------------------------------------------- values of the wrong type (from YAML or config.json)
@pytest.mark.parametrize("field,value,message", [
    ("norm_eps", "1e-5", "norm_eps='1e-5' must be a finite number"),
    ("init_std", True, "init_std=True must be a finite number"),
    ("hidden_dropout", None, "hidden_dropout=None must be a finite number"),
    ("attention_layout", 3, "attention_layout=3 must be a string"),
    ("layers", "full", "layers must be a list of layer specs, got str"),
    ("rope_by_kind", ["full"], "rope_by_kind must be a mapping"),
    ("rope", {"theta": "1e4"}, "rope.theta='1e4' must be a finite number"),
    ("rope", {"scaling": "linear", "factor": float("inf")}, "rope.factor=inf must be a finite number"),
    ("rope", {"original_max_position": 4096.0}, "rope.original_max_position=4096.0 must be an integer"),
])
def test_a_value_of_the_wrong_type_is_a_named_config_error(field, value, message):
    overrides = {field: value, **({"attention_layout": ""} if field == "layers" else {})}
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny(**overrides)

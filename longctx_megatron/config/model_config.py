"""ModelConfig: every size of the model, its layer plan, and the checks that run at construction."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from longctx_megatron.config.checks import require_real
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.layer_plan import (
    DEFAULT_LAYOUT,
    LayerSpec,
    parse_layout,
    scale_layout,
)
from longctx_megatron.config.rope import RopeConfig

INIT_METHODS = ("normal", "xavier", "kaiming")


# Upper bounds on sizes, ~100x beyond the largest published models: a config with more is damaged or
# hostile, and building its layer plan or model would take minutes and gigabytes before failing.
SIZE_LIMITS = {"d_model": 2**17, "n_layers": 2**12, "n_heads": 2**12, "n_kv_heads": 2**12, "d_ff": 2**20,
               "vocab_size": 2**24, "max_seq_len": 2**26}


@dataclass
class ModelConfig:
    """The model's shape. Defaults are the design's 7B long-context model (5,802,037,248 params)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    d_ff: int = 11008
    vocab_size: int = 32000
    max_seq_len: int = 102400

    # Attention pattern parameters used by the default and compact layouts.
    sliding_window: int = 4096
    global_every: int = 128
    dilated_window: int = 1024
    dilation: int = 4
    # Compact layout ("sliding:16,dilated:12,full:4"); empty = the design's, scaled to n_layers.
    attention_layout: str = ""
    # Explicit per-layer specs; when given they are the plan and attention_layout must be empty.
    layers: list[LayerSpec] | None = None

    # RoPE of every layer of a kind unless `layers` says otherwise; `rope` is the default for all.
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_by_kind: dict[str, RopeConfig] = field(default_factory=dict)

    norm_eps: float = 1e-5
    # Megatron's --apply-layernorm-1p: norm weights hold gamma - 1 (initialised to 0, the output is
    # x_normed * (1 + weight)), so bf16 weights keep their precision near a gain of 1.
    norm_zero_centered_gamma: bool = False
    init_method: str = "normal"
    init_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        # Mappings (from YAML/JSON) become dataclasses here, with errors naming where they are.
        if not isinstance(self.rope_by_kind, dict):
            raise ConfigError(f"rope_by_kind must be a mapping of attention kind -> rope, got "
                              f"{type(self.rope_by_kind).__name__}")
        if self.layers is not None and not isinstance(self.layers, list):
            raise ConfigError(f"layers must be a list of layer specs, got {type(self.layers).__name__}")
        if self.attention_layout is not None and not isinstance(self.attention_layout, str):
            raise ConfigError(f"attention_layout={self.attention_layout!r} must be a string such as 'full:32'")
        self.rope = RopeConfig.from_dict(self.rope, "rope")
        self.rope_by_kind = {
            kind: RopeConfig.from_dict(value, f"rope_by_kind.{kind}") for kind, value in self.rope_by_kind.items()
        }
        if self.layers is not None:
            self.layers = [LayerSpec.from_dict(spec, f"layers[{i}]") for i, spec in enumerate(self.layers)]
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.n_heads // self.n_kv_heads

    def layer_plan(self) -> list[LayerSpec]:
        """One resolved spec per layer, in order; every spec has its RoPE filled in."""
        if self.layers is not None:
            return [spec if spec.rope else replace(spec, rope=self._rope_for(spec.kind)) for spec in self.layers]
        layout = parse_layout(self.attention_layout) if self.attention_layout else scale_layout(
            DEFAULT_LAYOUT, self.n_layers
        )
        return [self._spec_for(kind) for kind, count in layout for _ in range(count)]

    def _rope_for(self, kind: str) -> RopeConfig:
        return self.rope_by_kind.get(kind, self.rope)

    def _spec_for(self, kind: str) -> LayerSpec:
        rope = self._rope_for(kind)
        if kind == "sliding":
            return LayerSpec(kind, window=self.sliding_window, global_every=self.global_every, rope=rope)
        if kind == "dilated":
            return LayerSpec(kind, window=self.dilated_window, dilation=self.dilation, rope=rope)
        return LayerSpec(kind, rope=rope)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
            if value > SIZE_LIMITS[name]:  # before anything is built from it (a config may come from anyone)
                raise ConfigError(f"{name}={value} exceeds {SIZE_LIMITS[name]:,}, far beyond any real model: "
                                  "the config is damaged or not a model's")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"(head_dim would be {self.d_model / self.n_heads:g}); change d_model or n_heads"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                "(each KV head serves a whole group of query heads); choose n_kv_heads among "
                f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim = d_model/n_heads = {self.head_dim} must be even for RoPE; change d_model or n_heads"
            )
        require_real(self, ("hidden_dropout", "attention_dropout", "init_std", "norm_eps"))
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must be in [0, 1]")
        if self.init_method not in INIT_METHODS:
            raise ConfigError(f"init_method={self.init_method!r} is unknown; choose one of {', '.join(INIT_METHODS)}")
        if not self.init_std > 0:  # also rejects NaN
            raise ConfigError(f"init_std={self.init_std} must be > 0")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be > 0")
        if self.layers is not None and self.attention_layout:
            raise ConfigError("give either attention_layout or layers, not both (layers is the explicit plan)")
        for kind in self.rope_by_kind:
            if kind not in ("sliding", "dilated", "full"):
                raise ConfigError(f"rope_by_kind has unknown attention kind {kind!r}; known: sliding, dilated, full")
        plan = self.layer_plan()
        if len(plan) != self.n_layers:
            raise ConfigError(
                f"the layer plan has {len(plan)} layers but n_layers={self.n_layers}; "
                "make the attention_layout counts (or the layers list) add up to n_layers"
            )
        for index, spec in enumerate(plan):
            self._validate_layer(index, spec)

    def _validate_layer(self, index: int, spec: LayerSpec) -> None:
        where = f"layer {index} ({spec.kind})"
        if spec.rope.scaling == "ntk" and self.head_dim <= 2:
            raise ConfigError(f"{where}: ntk RoPE scaling needs head_dim > 2 (head_dim={self.head_dim})")
        if spec.kind == "full":
            return
        field_name = "sliding_window" if spec.kind == "sliding" else "dilated_window"
        if spec.window <= 0:
            raise ConfigError(f"{where}: window={spec.window} must be > 0 (set {field_name})")
        if spec.kind == "sliding":
            if spec.window > self.max_seq_len:
                raise ConfigError(
                    f"{where}: sliding_window={spec.window} exceeds max_seq_len={self.max_seq_len}; "
                    "use a full layer or a smaller window"
                )
            if spec.global_every < 0:
                raise ConfigError(f"{where}: global_every={spec.global_every} must be >= 0 (0 = no global tokens)")
            if spec.dilation != 1:
                raise ConfigError(f"{where}: dilation={spec.dilation} applies to dilated layers only")
            return
        if spec.dilation < 1:
            raise ConfigError(f"{where}: dilation={spec.dilation} must be >= 1")
        if spec.global_every:
            raise ConfigError(f"{where}: global_every applies to sliding layers only")
        if spec.window * spec.dilation > self.max_seq_len:
            raise ConfigError(
                f"{where}: dilated span window*dilation = {spec.window}*{spec.dilation} = "
                f"{spec.window * spec.dilation} exceeds max_seq_len={self.max_seq_len}; "
                "shrink dilated_window or dilation"
            )
        if self.n_kv_heads < spec.dilation:
            raise ConfigError(
                f"{where}: dilation={spec.dilation} needs n_kv_heads >= dilation so that the heads' offsets "
                f"cover every residue mod {spec.dilation} (n_kv_heads={self.n_kv_heads}); lower dilation "
                "or raise n_kv_heads"
            )


def describe_plan(config: ModelConfig) -> str:
    """One line naming the architecture and its attention plan, runs of equal layers merged, as the start-up
    log prints it (``layers 0-15 sliding(window=4096, global every 128); 16-27 ...``)."""
    runs: list[tuple[int, int, str]] = []
    for index, spec in enumerate(config.layer_plan()):
        text = spec.describe() + (f" rope theta {spec.rope.theta:g}" if spec.rope.theta != 10000 else "")
        if runs and runs[-1][2] == text:
            runs[-1] = (runs[-1][0], index, text)
        else:
            runs.append((index, index, text))
    plan = "; ".join(f"layer{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''} {text}" for a, b, text in runs)
    return (f"architecture: {config.n_layers} layers, hidden {config.d_model}, {config.n_heads} heads / "
            f"{config.n_kv_heads} KV heads, SwiGLU {config.d_ff}, RMSNorm"
            + (" (1p)" if config.norm_zero_centered_gamma else "") + f", RoPE, vocab {config.vocab_size}, "
            + ("tied" if config.tie_embeddings else "untied") + " embeddings, dropout "
            f"{config.hidden_dropout:g}/{config.attention_dropout:g}; attention: {plan}")

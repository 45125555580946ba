"""Megatron-LM's architecture arguments -> the ModelConfig Megatron would build from them.

One definition of what a Megatron GPT command means, for the command line (``pretrain_longctx.py``
given Megatron's size flags and no ``--config``) and for the ``args`` a Megatron checkpoint carries.
Defaults are Megatron's (``megatron/training/arguments.py`` and its ``validate_args``): without
``--normalization RMSNorm`` Megatron builds LayerNorm, without ``--swiglu`` a GeLU MLP, without
``--position-embedding-type rope`` learned absolute positions, without ``--disable-bias-linear``
biases. This model has none of those, so such a command is refused, naming the flag to add, rather
than silently trained as a different architecture.

Attention is Megatron's: causal over the whole sequence in every layer, or one sliding window in
every layer with ``--window-size L,0`` (Megatron's (left, right) reach: L + 1 keys, self included).
The design's layer plan applies only when asked for (``--attention-layout`` or a ``--config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.rope import RopeConfig


def megatron_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron's default --ffn-hidden-size: 4h, or for SwiGLU 2/3 of that rounded down to a multiple of 64."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64 if swiglu else 4 * hidden_size


# Megatron args that must keep Megatron's default for the model to be this one (a checkpoint's args
# carry them all; on the command line their flags are refused outright, training/megatron_compat.py).
MUST_HOLD = {"num_experts": None, "multi_latent_attention": False, "mtp_num_layers": None, "squared_relu": False,
             "apply_residual_connection_post_layernorm": False, "softmax_type": "vanilla", "no_rope_freq": None,
             "hybrid_override_pattern": None, "hybrid_layer_pattern": None, "experimental_attention_variant": None,
             "heterogeneous_layers_config_path": None, "attention_output_gate": False, "qk_clip": False,
             "use_mup": False, "qk_l2_norm": False, "rotary_seq_len_interpolation_factor": None}
# Older or internal spellings of the same args.
ALIASES = {"layernorm_epsilon": "norm_epsilon", "layernorm_zero_centered_gamma": "apply_layernorm_1p"}
_SIZES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
          "max_position_embeddings")


@dataclass(frozen=True)
class MegatronArchitecture:
    """Megatron's architecture arguments under their argparse ``dest`` names, with Megatron's defaults.

    ``others`` holds the MUST_HOLD args that differ from Megatron's defaults (from a checkpoint's args);
    ``source`` says how messages name an arg: ``flags`` (``--normalization LayerNorm``, the command line)
    or ``args`` (``args.normalization='LayerNorm'``, a checkpoint's args).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    group_query_attention: bool = False
    num_query_groups: int = 1  # used only with group_query_attention, as in Megatron
    ffn_hidden_size: int | None = None
    kv_channels: int | None = None
    swiglu: bool = False
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    apply_layernorm_1p: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: float = 10000
    rotary_interleaved: bool = False
    use_rope_scaling: bool = False  # Llama-3.1's RoPE scaling, with megatron-core's fixed parameters
    rope_scaling_factor: float = 8.0
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    window_size: tuple[int, int] | None = None
    window_attn_skip_freq: int | list | None = None  # N: every N-th layer (1-based) full; a list: 1 sliding, 0 full
    max_position_embeddings: int | None = None
    others: dict = field(default_factory=dict)
    source: str = field(default="flags", compare=False, repr=False)

    @classmethod
    def from_args(cls, values: dict, where: str) -> MegatronArchitecture:
        """The architecture a Megatron checkpoint's ``args`` (as a dict) describe; unknown args are ignored,
        absent ones take Megatron's defaults, and sizes are checked to be positive integers (ConfigError
        naming ``where: args.<name>``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"others", "source"}
        given = {ALIASES.get(key, key): value for key, value in values.items() if value is not None}
        given.update({key: value for key, value in values.items() if key in names and value is not None})

        for name in _SIZES:
            value = given.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{where}: args.{name}={value!r} must be a positive integer")
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if name not in given:
                raise ConfigError(f"{where}: args.{name} is missing")
        others = {name: values[name] for name, default in MUST_HOLD.items()
                  if values.get(name) is not None and values[name] != default}
        window = given.get("window_size")
        if isinstance(window, list):
            given["window_size"] = tuple(window)
        return cls(**{name: given[name] for name in names if name in given}, others=others, source="args")

    def _say(self, name: str, value=None) -> str:
        """Arg ``name`` (with ``value``) as the user wrote it: a flag, or a checkpoint's args entry."""
        if self.source == "args":
            return f"args.{name}" + ("" if value is None else f"={value!r}")
        flag = "--" + name.replace("_", "-")
        if value is None or value is True:
            return flag
        return f"no {flag}" if value is False else f"{flag} {value}"

    def problems(self) -> list[str]:
        """What Megatron would build from these arguments that this model cannot, each with the fix."""
        say, found = self._say, []
        if self.normalization != "RMSNorm":
            found.append(f"{say('normalization', self.normalization)} (Megatron's default is LayerNorm; this model "
                         "uses RMSNorm: pass --normalization RMSNorm)")
        if not self.swiglu:
            found.append(f"{say('swiglu', False)}: a GeLU MLP (Megatron's default; this model's MLP is SwiGLU: pass "
                         "--swiglu)")
        if self.position_embedding_type != "rope":
            found.append(f"{say('position_embedding_type', self.position_embedding_type)} (Megatron's default is "
                         "learned_absolute; this model uses RoPE: pass --position-embedding-type rope)")
        if self.add_bias_linear or self.add_qkv_bias:
            name = "add_bias_linear" if self.add_bias_linear else "add_qkv_bias"
            said = "no --disable-bias-linear" if self.source == "flags" and self.add_bias_linear else say(name, True)
            found.append(f"{said}: biases in the linear layers (Megatron's default; this model has none: pass "
                         "--disable-bias-linear and no --add-qkv-bias)")
        if self.rotary_percent != 1.0:
            found.append(f"{say('rotary_percent', self.rotary_percent)} (RoPE on part of each head; this model "
                         "rotates the whole head: 1.0)")
        if self.rotary_interleaved:
            found.append(f"{say('rotary_interleaved', True)} (this model's RoPE pairs (j, j + D/2), rotate-half)")
        if self.qk_layernorm:
            found.append(f"{say('qk_layernorm', True)} (this model has no query/key norms)")
        for name, value in self.others.items():
            found.append(f"{say(name, value)} (this model needs {MUST_HOLD[name]!r}: a dense RMSNorm, SwiGLU, "
                         "RoPE GPT)")
        head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0
        if self.kv_channels is not None and self.kv_channels != head_dim:
            found.append(f"{say('kv_channels', self.kv_channels)} != --hidden-size / --num-attention-heads = "
                         f"{head_dim} (this model derives the head size)")
        window = self.window_size
        if window is not None and (len(window) != 2 or not all(isinstance(w, int) and not isinstance(w, bool)
                                                               for w in window) or window[1] != 0):
            found.append(f"{say('window_size', ','.join(map(str, window)))} (causal windows only: L,0)")
        elif window is not None and window[0] >= 0:
            try:
                self._kinds()
            except ConfigError as error:
                found.append(str(error))
        return found

    def check(self, what: str = "Megatron-LM would build a model this one cannot") -> None:
        """ConfigError ``what: <every problem>`` unless this model can build these arguments."""
        problems = self.problems()
        if problems:
            raise ConfigError(f"{what}: " + "; ".join(problems))

    def _kinds(self) -> list[str]:
        """Each layer's kind: sliding where the window applies, full where window_attn_skip_freq skips it."""
        skip, layers = self.window_attn_skip_freq, self.num_layers
        if skip is None:
            return ["sliding"] * layers
        if isinstance(skip, int) and not isinstance(skip, bool) and skip > 0:
            return ["full" if n % skip == 0 else "sliding" for n in range(1, layers + 1)]
        if isinstance(skip, list) and len(skip) == layers and all(value in (0, 1) for value in skip):
            return ["sliding" if value else "full" for value in skip]
        raise ConfigError(f"{self._say('window_attn_skip_freq', skip)} must be a positive integer or a list of "
                          f"{layers} 0/1 flags")

    def model_config(self, vocab_size: int, seq_length: int | None = None) -> ModelConfig:
        """The ModelConfig Megatron's GPTModel would have (``vocab_size``: the padded vocabulary);
        ConfigError listing every difference this model cannot build."""
        self.check()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{self._say('hidden_size', self.hidden_size)} must be divisible by "
                              f"{self._say('num_attention_heads', self.num_attention_heads)}")
        layers = self.num_layers
        max_len = self.max_position_embeddings or seq_length or ModelConfig.max_seq_len
        windowed = self.window_size is not None and self.window_size[0] >= 0  # Megatron: (-1, 0) is no window
        if windowed and self.window_size[0] + 1 > max_len:
            raise ConfigError(f"{self._say('window_size', ','.join(map(str, self.window_size)))} reaches "
                              f"{self.window_size[0] + 1} keys, beyond the model's length {max_len} "
                              f"({self._say('max_position_embeddings')}): raise it or shrink the window")
        runs: list[list] = []
        for kind in self._kinds() if windowed else ["full"] * layers:
            if runs and runs[-1][0] == kind:
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
        rope = RopeConfig(theta=float(self.rotary_base))
        if self.use_rope_scaling:
            rope = RopeConfig(theta=float(self.rotary_base), scaling="llama3", factor=float(self.rope_scaling_factor),
                              original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0)
        return ModelConfig(
            d_model=self.hidden_size, n_layers=layers, n_heads=self.num_attention_heads,
            n_kv_heads=self.num_query_groups if self.group_query_attention else self.num_attention_heads,
            d_ff=self.ffn_hidden_size or megatron_ffn_hidden_size(self.hidden_size, self.swiglu),
            vocab_size=vocab_size, max_seq_len=max_len,
            attention_layout=",".join(f"{kind}:{count}" for kind, count in runs),
            sliding_window=self.window_size[0] + 1 if windowed else min(ModelConfig.sliding_window, max_len),
            global_every=0, dilated_window=min(ModelConfig.dilated_window, max_len), rope=rope,
            norm_eps=float(self.norm_epsilon), norm_zero_centered_gamma=bool(self.apply_layernorm_1p),
            init_std=float(self.init_method_std), hidden_dropout=float(self.hidden_dropout),
            attention_dropout=float(self.attention_dropout),
            tie_embeddings=not self.untie_embeddings_and_output_weights,
        )


def config_arguments(config: ModelConfig) -> dict:
    """The Megatron arguments that describe what ``config`` already is (its sizes and architecture)."""
    return dict(num_layers=config.n_layers, hidden_size=config.d_model, num_attention_heads=config.n_heads,
                group_query_attention=True, num_query_groups=config.n_kv_heads, ffn_hidden_size=config.d_ff,
                swiglu=True, normalization="RMSNorm", norm_epsilon=config.norm_eps,
                apply_layernorm_1p=config.norm_zero_centered_gamma, position_embedding_type="rope",
                rotary_base=config.rope.theta, add_bias_linear=False,
                untie_embeddings_and_output_weights=not config.tie_embeddings, hidden_dropout=config.hidden_dropout,
                attention_dropout=config.attention_dropout, init_method_std=config.init_std,
                max_position_embeddings=config.max_seq_len)


# The ModelConfig fields each Megatron argument decides, when it adjusts an existing model.
_FIELDS_OF = {"num_layers": ("n_layers",), "hidden_size": ("d_model",), "num_attention_heads": ("n_heads",),
              "group_query_attention": ("n_kv_heads",), "num_query_groups": ("n_kv_heads",),
              "ffn_hidden_size": ("d_ff",), "max_position_embeddings": ("max_seq_len",), "norm_epsilon": ("norm_eps",),
              "apply_layernorm_1p": ("norm_zero_centered_gamma",), "init_method_std": ("init_std",),
              "hidden_dropout": ("hidden_dropout",), "attention_dropout": ("attention_dropout",),
              "untie_embeddings_and_output_weights": ("tie_embeddings",),
              "use_rope_scaling": ("rope",), "rope_scaling_factor": ("rope",),
              "window_size": ("attention_layout", "sliding_window", "global_every"),
              "window_attn_skip_freq": ("attention_layout", "sliding_window", "global_every")}


def adjustments(config: ModelConfig, given: dict) -> dict:
    """ModelConfig overrides for Megatron arguments ``given`` on top of ``config`` (a --config file or the
    built-in model), by the same rules as a whole Megatron model: the arguments not given keep
    ``config``'s values, so sizes, the head-size check and the window see the adjusted model; what
    this model cannot build is refused (ConfigError). ``config``'s own layer plan stays unless a
    window argument is given."""
    if not given:
        return {}
    architecture = MegatronArchitecture(**{**config_arguments(config), **given})
    architecture.check("the model flags ask for what this model cannot build")
    target = architecture.model_config(config.vocab_size)
    overrides = {name: getattr(target, name) for arg in given for name in _FIELDS_OF.get(arg, ())}
    if "rotary_base" in given and "rope" not in overrides:  # keep the config's RoPE scaling, change its base
        overrides["rope"] = dataclasses.replace(config.rope, theta=float(given["rotary_base"]))
    if "attention_layout" in overrides:
        overrides["layers"] = None
    return overrides

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
from dataclasses import dataclass

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.rope import RopeConfig


def megatron_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron's default --ffn-hidden-size: 4h, or for SwiGLU 2/3 of that rounded down to a multiple of 64."""
    return int((4 * hidden_size * 2 / 3) / 64) * 64 if swiglu else 4 * hidden_size


@dataclass(frozen=True)
class MegatronArchitecture:
    """Megatron's architecture arguments under their argparse ``dest`` names, with Megatron's defaults."""

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
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    window_size: tuple[int, int] | None = None
    max_position_embeddings: int | None = None

    def problems(self) -> list[str]:
        """What Megatron would build from these arguments that this model cannot, each with the fix."""
        found = []
        if self.normalization != "RMSNorm":
            found.append(f"--normalization {self.normalization} (Megatron's default is LayerNorm; this model uses "
                         "RMSNorm: pass --normalization RMSNorm)")
        if not self.swiglu:
            found.append("a GeLU MLP (Megatron's default without --swiglu; this model's MLP is SwiGLU: pass --swiglu)")
        if self.position_embedding_type != "rope":
            found.append(f"--position-embedding-type {self.position_embedding_type} (Megatron's default is "
                         "learned_absolute; this model uses RoPE: pass --position-embedding-type rope)")
        if self.add_bias_linear or self.add_qkv_bias:
            found.append("biases in the linear layers (Megatron's default; this model has none: pass "
                         "--disable-bias-linear and no --add-qkv-bias)")
        if self.rotary_percent != 1.0:
            found.append(f"--rotary-percent {self.rotary_percent} (RoPE on part of each head; this model rotates "
                         "the whole head: 1.0)")
        if self.rotary_interleaved:
            found.append("--rotary-interleaved (this model's RoPE pairs (j, j + D/2), rotate-half)")
        if self.qk_layernorm:
            found.append("--qk-layernorm (this model has no query/key norms)")
        head_dim = self.hidden_size // self.num_attention_heads if self.num_attention_heads else 0
        if self.kv_channels is not None and self.kv_channels != head_dim:
            found.append(f"--kv-channels {self.kv_channels} != --hidden-size / --num-attention-heads = {head_dim} "
                         "(this model derives the head size)")
        if self.window_size is not None and (len(self.window_size) != 2 or self.window_size[1] != 0
                                             or self.window_size[0] < 0):
            found.append(f"--window-size {','.join(map(str, self.window_size))} (causal windows only: L,0)")
        return found

    def model_config(self, vocab_size: int, seq_length: int | None = None) -> ModelConfig:
        """The ModelConfig Megatron's GPTModel would have (``vocab_size``: the padded vocabulary);
        ConfigError listing every difference this model cannot build."""
        problems = self.problems()
        if problems:
            raise ConfigError("Megatron-LM would build a model this one cannot: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} must be divisible by --num-attention-heads "
                              f"{self.num_attention_heads}")
        layers = self.num_layers
        max_len = self.max_position_embeddings or seq_length or ModelConfig.max_seq_len
        window = self.window_size[0] + 1 if self.window_size else None
        return ModelConfig(
            d_model=self.hidden_size, n_layers=layers, n_heads=self.num_attention_heads,
            n_kv_heads=self.num_query_groups if self.group_query_attention else self.num_attention_heads,
            d_ff=self.ffn_hidden_size or megatron_ffn_hidden_size(self.hidden_size, self.swiglu),
            vocab_size=vocab_size, max_seq_len=max_len,
            attention_layout=f"sliding:{layers}" if window else f"full:{layers}",
            sliding_window=min(window or ModelConfig.sliding_window, max_len), global_every=0,
            dilated_window=min(ModelConfig.dilated_window, max_len),
            rope=RopeConfig(theta=float(self.rotary_base)), norm_eps=self.norm_epsilon,
            norm_zero_centered_gamma=self.apply_layernorm_1p, init_std=self.init_method_std,
            hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
            tie_embeddings=not self.untie_embeddings_and_output_weights,
        )


ARCHITECTURE_FIELDS = frozenset(field.name for field in dataclasses.fields(MegatronArchitecture))

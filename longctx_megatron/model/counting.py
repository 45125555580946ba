"""Exact parameter count and model FLOPs per token, from the config alone (no model is built).

FLOPs are *model* FLOPs (2 per multiply-add, forward + backward = 3x forward): the matmuls of every
projection plus QK^T and PV over the keys each query really sees under its layer's pattern, the
count coming from the same rule the kernels use (patterns.keys_per_query; with packed documents,
per document). Kernel overheads such as
the half-empty key blocks of the chunked backend are not counted, as MFU convention requires.
"""

from __future__ import annotations

import functools

from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.attention.layer import GroupedQKV
from longctx_megatron.model.attention.patterns import pattern_for


def layer_matmul_params(config: ModelConfig) -> int:
    """Weights of one layer's projections (QKV, output, SwiGLU), whole (unsharded)."""
    qkv = config.d_model * GroupedQKV(config.group_size, config.head_dim).rows(config.n_kv_heads)
    out = config.n_heads * config.head_dim * config.d_model
    mlp = 3 * config.d_model * config.d_ff
    return qkv + out + mlp


def estimate_params(config: ModelConfig) -> int:
    """Number of parameters; tied input/output embeddings count once."""
    per_layer = layer_matmul_params(config) + 2 * config.d_model  # + two RMSNorm weights
    embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return config.n_layers * per_layer + embeddings + config.d_model  # + final norm


def mean_keys_per_query(config: ModelConfig, seq_len: int, documents: list[list[int]] | None = None) -> list[float]:
    """Per layer: visible keys per query averaged over positions and heads, for samples of
    ``seq_len`` tokens, or for samples packed with ``documents`` (each sample's document lengths,
    --reset-attention-mask: every document is a sequence of its own)."""
    samples = documents if documents is not None else [[seq_len]]
    tokens = sum(sum(lengths) for lengths in samples)
    means = []
    for spec in config.layer_plan():
        pattern = pattern_for(spec, config.group_size)
        if spec.kind == "dilated":  # offsets differ by KV head; one query head per KV head suffices
            heads = range(0, config.n_heads, config.group_size)
        else:
            heads = range(1)
        total = sum(_keys_in_sequence(pattern, length, head) for head in heads
                    for lengths in samples for length in lengths)
        means.append(total / tokens / len(heads))
    return means


@functools.lru_cache(maxsize=65536)
def _keys_in_sequence(pattern, length: int, head: int) -> int:
    """Keys seen by all queries of one sequence (or document) of ``length`` tokens."""
    return int(pattern.keys_per_query(length, head).sum())


def layer_forward_flops(config: ModelConfig, seq_len: int, documents: list[list[int]] | None = None) -> list[float]:
    """Forward FLOPs per token of each layer: its projections plus QK^T and PV over its real span."""
    dense = 2 * layer_matmul_params(config)
    return [dense + 4 * config.n_heads * config.head_dim * keys
            for keys in mean_keys_per_query(config, seq_len, documents)]


def head_forward_flops(config: ModelConfig) -> float:
    """Forward FLOPs per token of the output projection (the logits)."""
    return 2.0 * config.vocab_size * config.d_model


def flops_per_token(config: ModelConfig, seq_len: int, training: bool = True,
                    documents: list[list[int]] | None = None) -> float:
    """Model FLOPs per token at ``seq_len`` (forward + backward when ``training``), or averaged over
    samples packed with ``documents`` (each sample's document lengths)."""
    forward = sum(layer_forward_flops(config, seq_len, documents)) + head_forward_flops(config)
    return forward * (3 if training else 1)

"""Hugging Face Llama / Mistral <-> native: configs, tensor names and layouts, one layer at a time.

Tensor mapping (ADR 0008), per layer i, with H query heads, K KV heads, G = H / K, head dim D:

* ``q_proj``, ``k_proj``, ``v_proj`` -> ``attention.qkv``, grouped per KV head g: the rows of query
  heads gG .. gG+G-1, then k_g, then v_g (``GroupedQKV``, the layout attention declares; packed and
  unpacked by it). Hugging Face's query head h uses KV head h // G, as ours.
* RoPE: both use the rotate-half convention (pair (j, j + D/2)) on the same row order, so no
  permutation of q/k rows is needed (a Meta-format checkpoint, interleaved pairs, would need one).
* ``gate_proj``, ``up_proj`` -> ``mlp.gate_up`` = [gate; up] (the MLP's ``GATE_UP``); ``down_proj`` -> ``mlp.down``;
  ``o_proj`` -> ``attention.out``; ``input_layernorm`` -> ``attention_norm``;
  ``post_attention_layernorm`` -> ``mlp_norm``; ``model.norm`` -> ``final_norm``;
  ``model.embed_tokens`` -> ``embedding``; ``lm_head`` -> ``output`` (absent when tied).

Attention plans: Llama is full causal attention in every layer; Mistral one sliding window of W
keys (self included, as ours) in every layer, without global tokens. Other plans have no Hugging
Face equivalent.
"""

from __future__ import annotations

import dataclasses

import torch

from longctx_megatron.checkpoint.plan_export import layer_ranges, layers_apart, plan_problems
from longctx_megatron.config import ModelConfig
from longctx_megatron.config.checks import is_real
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.model.attention.layer import GroupedQKV
from longctx_megatron.model.mlp import GATE_UP

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}
_ROPE_FIELDS = {"factor": "factor", "original_max_position_embeddings": "original_max_position",
                "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                "beta_fast": "beta_fast", "beta_slow": "beta_slow"}


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file, field or tensor."""


# ------------------------------------------------------------------------------------------ configs
def rope_from_hf(hf: dict, where: str) -> RopeConfig:
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ConversionError(f"{where}: {key} must be an object or null, got {hf[key]!r}")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}  # transformers 4 / 5
    theta = _number(params.pop("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", where)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_TYPES:
        raise ConversionError(f"{where}: rope type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    unknown = sorted(key for key, value in params.items() if key not in _ROPE_FIELDS and value is not None)
    if unknown:
        raise ConversionError(f"{where}: rope fields {unknown} are not supported")
    fields = {_ROPE_FIELDS[key]: value for key, value in params.items() if key in _ROPE_FIELDS and value is not None}
    if kind == "yarn":
        fields.setdefault("original_max_position", _size(hf, "max_position_embeddings", where))
    if kind == "default":
        fields = {}
    try:
        return RopeConfig(theta=float(theta), scaling=_ROPE_TYPES[kind], **fields)
    except ConfigError as error:
        raise ConversionError(f"{where}: rope_scaling: {error}") from None


def _number(value, key: str, where: str) -> float:
    """A JSON number, never a string such as "1e4" converted on the way."""
    if not is_real(value):
        raise ConversionError(f"{where}: {key}={value!r} must be a number")
    return value


def _size(hf: dict, key: str, where: str, default: int | None = None) -> int:
    """A positive integer field; ``default`` when absent or null (as transformers treats null)."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise ConversionError(f"{where}: missing field {key!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConversionError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def rope_to_hf(rope: RopeConfig) -> dict:
    """``rope_theta`` and ``rope_scaling`` as transformers reads them (4.x names; 5.x converts them)."""
    kind = {ours: theirs for theirs, ours in _ROPE_TYPES.items()}.get(rope.scaling)
    if kind is None:
        raise ConversionError(f"RoPE scaling {rope.scaling!r} has no Hugging Face equivalent")
    if kind == "default":
        return {"rope_theta": rope.theta, "rope_scaling": None}
    used = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor",
                                              "high_freq_factor"),
            "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")}[kind]
    return {"rope_theta": rope.theta,
            "rope_scaling": {"rope_type": kind, **{key: getattr(rope, _ROPE_FIELDS[key]) for key in used}}}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConversionError(f"{where}: expected a JSON object, got a JSON {type(hf).__name__}")
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        architectures = hf.get("architectures")
        found = ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures else model_type
        raise ConversionError(f"{where}: unsupported architecture {found!r} (model_type {model_type!r}); supported: "
                              f"{', '.join(ARCHITECTURES.values())}")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, expected) != expected:
            raise ConversionError(f"{where}: {key}={hf[key]!r} is not supported (this model has {expected!r})")
    d_model, heads, layers = (_size(hf, key, where) for key in ("hidden_size", "num_attention_heads",
                                                                 "num_hidden_layers"))
    head_dim = _size(hf, "head_dim", where, default=d_model // heads)
    if head_dim * heads != d_model:
        raise ConversionError(f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size="
                              f"{d_model}; this model derives head_dim = hidden_size / num_attention_heads")
    sliding = model_type == "mistral" and hf.get("use_sliding_window", True) and hf.get("sliding_window") is not None
    window = _size(hf, "sliding_window", where) if sliding else None
    max_len = _size(hf, "max_position_embeddings", where)
    try:
        return ModelConfig(
            d_model=d_model, n_layers=layers, n_heads=heads,
            n_kv_heads=_size(hf, "num_key_value_heads", where, default=heads),
            d_ff=_size(hf, "intermediate_size", where), vocab_size=_size(hf, "vocab_size", where), max_seq_len=max_len,
            attention_layout=f"sliding:{layers}" if window else f"full:{layers}",
            sliding_window=window or min(ModelConfig.sliding_window, max_len), global_every=0,
            dilated_window=min(ModelConfig.dilated_window, max_len), rope=rope_from_hf(hf, where),
            norm_eps=_number(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            init_std=_number(hf.get("initializer_range", 0.02), "initializer_range", where),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except ConfigError as error:
        raise ConversionError(f"{where}: {error}") from None


def config_to_hf(config: ModelConfig, allow_approximate: bool = False) -> tuple[dict, list[str]]:
    """config.json for ``config`` and the list of what an approximate export changes (empty when exact)."""
    plan = config.layer_plan()
    sliding = {(spec.window, spec.global_every) for spec in plan if spec.kind == "sliding"}
    mistral = all(spec.kind == "sliding" for spec in plan) and len(sliding) == 1 and not next(iter(sliding))[1]
    groups, rope_layers = layers_apart(config, lambda spec: not mistral and spec.kind != "full")
    problems = plan_problems(config, groups, rope_layers)
    if config.rope.scaling == "ntk":
        problems.append("RoPE scaling 'ntk' (static NTK) has no Hugging Face rope_type")
    notes = []
    if problems:
        if not allow_approximate:
            raise ConversionError(
                "this layer plan has no Hugging Face equivalent: Llama runs full causal attention in every layer "
                "and Mistral one sliding window without global tokens in every layer; " + "; ".join(problems)
                + ". Pass --allow-approximate to export it as Llama with full causal attention in those layers "
                "(the model's outputs will change)")
        notes = [f"{layer_ranges(layers)}: {what} -> full causal attention (every key they saw, and more)"
                 for what, layers in groups.items()]
        if rope_layers:
            notes.append(f"{layer_ranges(rope_layers)}: their own RoPE -> the model's RoPE ({config.rope})")
        mistral = False
    rope = dataclasses.replace(config.rope, scaling="none") if config.rope.scaling == "ntk" else config.rope
    if config.rope.scaling == "ntk":
        notes.append(f"RoPE scaling 'ntk' (factor {config.rope.factor}) -> none")
    kind = "mistral" if mistral else "llama"
    hf = {
        "architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.d_model // config.n_heads,
        "intermediate_size": config.d_ff, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        "initializer_range": config.init_std, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True,
        "torch_dtype": "float32", **rope_to_hf(rope),
    }
    if mistral:
        hf["sliding_window"] = plan[0].window
    return hf, notes


# ------------------------------------------------------------------------------------------ tensors
def _dims(config: ModelConfig) -> tuple[int, int, int, int]:
    head_dim = config.d_model // config.n_heads
    return config.n_heads, config.n_kv_heads, head_dim, config.d_model


def layer_from_hf(index: int, get, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Native tensors of layer ``index``; ``get(hf_name, expected_shape)`` reads one Hugging Face tensor."""
    heads, kv, head_dim, d = _dims(config)
    hf, ours = f"model.layers.{index}.", f"layers.{index}."
    qkv = GroupedQKV(heads // kv, head_dim).pack(get(hf + "self_attn.q_proj.weight", (heads * head_dim, d)),
                                                 get(hf + "self_attn.k_proj.weight", (kv * head_dim, d)),
                                                 get(hf + "self_attn.v_proj.weight", (kv * head_dim, d)))
    return {
        ours + "attention_norm.weight": get(hf + "input_layernorm.weight", (d,)),
        ours + "attention.qkv.weight": qkv,
        ours + "attention.out.weight": get(hf + "self_attn.o_proj.weight", (d, heads * head_dim)),
        ours + "mlp_norm.weight": get(hf + "post_attention_layernorm.weight", (d,)),
        ours + "mlp.gate_up.weight": GATE_UP.pack(get(hf + "mlp.gate_proj.weight", (config.d_ff, d)),
                                                  get(hf + "mlp.up_proj.weight", (config.d_ff, d))),
        ours + "mlp.down.weight": get(hf + "mlp.down_proj.weight", (d, config.d_ff)),
    }


def _norm_gain(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A norm's gain as Hugging Face stores it: ours holds gain - 1 under ``norm_zero_centered_gamma``."""
    return weight + 1 if config.norm_zero_centered_gamma else weight


def layer_to_hf(index: int, get, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of layer ``index``; ``get(native_name)`` reads one global native tensor."""
    heads, kv, head_dim, d = _dims(config)
    hf, ours = f"model.layers.{index}.", f"layers.{index}."
    q, k, v = GroupedQKV(heads // kv, head_dim).unpack(get(ours + "attention.qkv.weight"))
    gate, up = GATE_UP.unpack(get(ours + "mlp.gate_up.weight"))
    return {
        hf + "input_layernorm.weight": _norm_gain(get(ours + "attention_norm.weight"), config),
        hf + "self_attn.q_proj.weight": q,
        hf + "self_attn.k_proj.weight": k,
        hf + "self_attn.v_proj.weight": v,
        hf + "self_attn.o_proj.weight": get(ours + "attention.out.weight"),
        hf + "post_attention_layernorm.weight": _norm_gain(get(ours + "mlp_norm.weight"), config),
        hf + "mlp.gate_proj.weight": gate,
        hf + "mlp.up_proj.weight": up,
        hf + "mlp.down_proj.weight": get(ours + "mlp.down.weight"),
    }


def outer_from_hf(get, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output weight."""
    out = {"embedding.weight": get("model.embed_tokens.weight", (config.vocab_size, config.d_model)),
           "final_norm.weight": get("model.norm.weight", (config.d_model,))}
    if not config.tie_embeddings:
        out["output.weight"] = get("lm_head.weight", (config.vocab_size, config.d_model))
    return out


def outer_to_hf(get, config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": get("embedding.weight"),
           "model.norm.weight": _norm_gain(get("final_norm.weight"), config)}
    if not config.tie_embeddings:
        out["lm_head.weight"] = get("output.weight")
    return out

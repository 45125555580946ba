"""Model configuration: dataclasses, layer plan, validation, serialization (counting is model/counting.py)."""

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.layer_plan import ATTENTION_KINDS, LayerSpec
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.rope import RopeConfig
from longctx_megatron.config.serialization import load_config, save_config

__all__ = ["ATTENTION_KINDS", "ConfigError", "LayerSpec", "ModelConfig", "RopeConfig", "load_config", "save_config"]

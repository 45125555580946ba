"""YAML and JSON round trip of ModelConfig; unknown keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from longctx_megatron.atomic_file import atomic_write
from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.rope import check_fields


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: Any) -> ModelConfig:
    """Nested mappings (rope, layers) are checked by the dataclasses themselves."""
    check_fields(ModelConfig, data, "a model config")
    return ModelConfig(**data)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: config files must end in .yaml, .yml or .json")
    return suffix


def save_config(config: ModelConfig, path: str | os.PathLike) -> None:
    """Write atomically (temporary file + rename) as YAML or JSON by suffix."""
    path = Path(path)
    data = config_to_dict(config)
    if _suffix(path) == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False)
    with atomic_write(path) as handle:
        handle.write(text)


def load_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    suffix = _suffix(path)
    text = path.read_text()
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {error}") from error
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error

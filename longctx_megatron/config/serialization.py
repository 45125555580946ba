"""YAML and JSON round trip of ModelConfig; unknown keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.layer_plan import LayerSpec
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.config.rope import RopeConfig


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_keys(data: dict, cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a model config must be a mapping, got {type(data).__name__}")
    _check_keys(data, ModelConfig, "model config")
    data = dict(data)
    if isinstance(data.get("rope"), dict):
        _check_keys(data["rope"], RopeConfig, "rope")
    for kind, rope in (data.get("rope_by_kind") or {}).items():
        if isinstance(rope, dict):
            _check_keys(rope, RopeConfig, f"rope_by_kind.{kind}")
    for index, layer in enumerate(data.get("layers") or []):
        if isinstance(layer, dict):
            _check_keys(layer, LayerSpec, f"layers[{index}]")
            if isinstance(layer.get("rope"), dict):
                _check_keys(layer["rope"], RopeConfig, f"layers[{index}].rope")
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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

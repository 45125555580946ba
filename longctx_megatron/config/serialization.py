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


def _file_mode(path: Path) -> int:
    """The existing file's mode, or 0666 minus the umask for a new file."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep what open() would give
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

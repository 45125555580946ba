"""RoPE settings for one layer: base frequency and the context-extension scaling rule.

The scaling names follow Hugging Face's ``rope_scaling`` so checkpoints convert without renaming:
``none``, ``linear`` (position interpolation), ``ntk`` (static NTK-aware base stretch),
``yarn`` and ``llama3``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from longctx_megatron.config.checks import require_real
from longctx_megatron.config.errors import ConfigError

ROPE_SCALING_TYPES = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    # Context length the unscaled model was trained on (yarn, llama3).
    original_max_position: int = 4096
    # llama3: wavelengths above original/low_freq_factor are interpolated, below
    # original/high_freq_factor kept, and smoothly blended in between.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn: rotations-per-context boundaries of the ramp between interpolation and extrapolation.
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        self.validate("rope")

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RopeConfig:
        """Build from a YAML/JSON mapping; errors name ``where`` (e.g. ``layers[3].rope``)."""
        if isinstance(data, cls):
            return data
        check_fields(cls, data, where)
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    def validate(self, where: str) -> None:
        if self.scaling not in ROPE_SCALING_TYPES:
            raise ConfigError(
                f"{where}.scaling={self.scaling!r} is unknown; choose one of {', '.join(ROPE_SCALING_TYPES)}"
            )
        require_real(self, ("theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"),
                     f"{where}.")
        if isinstance(self.original_max_position, bool) or not isinstance(self.original_max_position, int):
            raise ConfigError(f"{where}.original_max_position={self.original_max_position!r} must be an integer")
        if not self.theta > 0:  # also rejects NaN
            raise ConfigError(f"{where}.theta={self.theta} must be > 0 (10000 is the usual base)")
        if self.scaling != "none" and not self.factor >= 1.0:
            raise ConfigError(
                f"{where}.factor={self.factor} must be >= 1 for {self.scaling} scaling "
                "(it is the context-length multiplier)"
            )
        if not self.original_max_position > 0:
            raise ConfigError(f"{where}.original_max_position={self.original_max_position} must be > 0")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                f"{where}: llama3 scaling needs high_freq_factor ({self.high_freq_factor}) > "
                f"low_freq_factor ({self.low_freq_factor}) > 0"
            )
        if self.scaling == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(
                f"{where}: yarn scaling needs beta_fast ({self.beta_fast}) > beta_slow ({self.beta_slow}) > 0"
            )


def check_fields(cls: type, data: Any, where: str) -> None:
    """``data`` must be a mapping whose keys are fields of dataclass ``cls``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")

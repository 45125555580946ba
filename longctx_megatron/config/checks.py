"""Type checks shared by the config dataclasses: a value read from YAML or someone's config.json may
be a string, a bool or a list where a number belongs, and must fail as a named ConfigError rather
than a TypeError from the first comparison."""

from __future__ import annotations

import math

from longctx_megatron.config.errors import ConfigError


def is_real(value) -> bool:
    """An int or float, not a bool (True is an int to Python, never a size or a rate here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_real(owner, names: tuple[str, ...], where: str = "") -> None:
    """Each field of ``owner`` in ``names`` must be a finite real number."""
    for name in names:
        value = getattr(owner, name)
        if not is_real(value) or not math.isfinite(value):
            raise ConfigError(f"{where}{name}={value!r} must be a finite number")

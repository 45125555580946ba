"""The layer plan: one attention spec per layer of the heterogeneous stack.

A plan is written three ways: the design default scaled to any depth, a compact string such as
``sliding:16,dilated:12,full:4``, or an explicit per-layer list (YAML/JSON). All three resolve to a
list of :class:`LayerSpec`, the only form the model reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.rope import RopeConfig, check_fields

ATTENTION_KINDS = ("sliding", "dilated", "full")

# The design's 32-layer stack: 16 sliding (+ global tokens), 12 dilated, 4 full, in that order.
DEFAULT_LAYOUT = (("sliding", 16), ("dilated", 12), ("full", 4))


@dataclass(frozen=True)
class LayerSpec:
    """Attention pattern of one layer and its RoPE.

    ``window`` counts visible keys: for ``sliding`` the W most recent positions (self included),
    for ``dilated`` W keys spaced ``dilation`` apart (a span of W * dilation positions).
    ``global_every`` G > 0 makes every position p with p % G == 0 a global token (sliding only).
    ``rope`` None means "the config's RoPE for this kind" (resolved by ModelConfig.layer_plan).
    """

    kind: str
    window: int = 0
    global_every: int = 0
    dilation: int = 1
    rope: RopeConfig | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise ConfigError(
                f"unknown attention kind {self.kind!r}; known kinds: {', '.join(ATTENTION_KINDS)}"
            )
        if self.rope is not None:
            object.__setattr__(self, "rope", RopeConfig.from_dict(self.rope, "rope"))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerSpec:
        """Build from a YAML/JSON mapping; errors name ``where`` (e.g. ``layers[3]``)."""
        if isinstance(data, cls):
            return data
        check_fields(cls, data, where)
        data = dict(data)
        if data.get("rope") is not None:
            data["rope"] = RopeConfig.from_dict(data["rope"], f"{where}.rope")
        try:
            return cls(**data)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    def describe(self) -> str:
        if self.kind == "sliding":
            extra = f", global every {self.global_every}" if self.global_every else ""
            return f"sliding(window={self.window}{extra})"
        if self.kind == "dilated":
            return f"dilated(window={self.window}, dilation={self.dilation})"
        return "full"


def parse_layout(text: str) -> list[tuple[str, int]]:
    """Parse ``kind:count,kind:count`` into (kind, count) pairs, in order."""
    pairs = []
    for item in text.split(","):
        kind, sep, count = item.strip().partition(":")
        kind = kind.strip()
        if kind not in ATTENTION_KINDS:
            raise ConfigError(
                f"attention_layout={text!r}: unknown attention kind {kind!r}; "
                f"known kinds: {', '.join(ATTENTION_KINDS)}"
            )
        try:
            layers = int(count) if sep and count.strip().isascii() else 0
        except ValueError:
            layers = 0
        if layers <= 0:
            raise ConfigError(
                f"attention_layout={text!r}: {item.strip()!r} needs a positive layer count, e.g. '{kind}:4'"
            )
        pairs.append((kind, layers))
    return pairs


def scale_layout(layout: tuple[tuple[str, int], ...], n_layers: int) -> list[tuple[str, int]]:
    """Scale a layout to ``n_layers`` keeping its proportions and order.

    Every kind keeps at least one layer while n_layers allows it; leftover layers go to the kinds
    with the largest rounding remainder (ties: earlier kind), so 32 layers reproduce the design.
    """
    total = sum(count for _, count in layout)
    kinds = [kind for kind, _ in layout]
    if n_layers < len(kinds):  # too shallow for every kind: keep the first n_layers kinds
        return [(kind, 1) for kind in kinds[:n_layers]]
    exact = [count * n_layers / total for _, count in layout]
    counts = [max(1, int(x)) for x in exact]
    while sum(counts) < n_layers:
        i = max(range(len(kinds)), key=lambda k: (exact[k] - counts[k], -k))
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((k for k in range(len(kinds)) if counts[k] > 1), key=lambda k: (counts[k] - exact[k], k))
        counts[i] -= 1
    return list(zip(kinds, counts, strict=True))

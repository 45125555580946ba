"""Which layers of a plan an export format cannot express, named by layer ranges: one wording for the
Hugging Face and the Megatron-LM exports."""

from __future__ import annotations

from collections.abc import Callable

from longctx_megatron.config import ModelConfig
from longctx_megatron.config.layer_plan import LayerSpec


def describe_spec(spec: LayerSpec) -> str:
    """A layer's attention in words ("sliding window 4096 with global tokens every 128", ...)."""
    if spec.kind == "sliding":
        return f"sliding window {spec.window}" + (f" with global tokens every {spec.global_every}"
                                                   if spec.global_every else "")
    if spec.kind == "dilated":
        return f"dilated attention (window {spec.window}, dilation {spec.dilation})"
    return "full causal attention"


def layer_ranges(layers: list[int]) -> str:
    """"layer 2" or "layers 0-15, 20"."""
    spans, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None], strict=True):
        if current != previous + 1:
            spans.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(spans)


def layers_apart(config: ModelConfig, cannot: Callable[[LayerSpec], bool]) -> tuple[dict[str, list[int]], list[int]]:
    """(the layers ``cannot`` holds for, grouped by their attention in words; the layers whose RoPE is not
    the model's)."""
    plan = config.layer_plan()
    groups: dict[str, list[int]] = {}
    for index, spec in enumerate(plan):
        if cannot(spec):
            groups.setdefault(describe_spec(spec), []).append(index)
    return groups, [index for index, spec in enumerate(plan) if spec.rope != config.rope]


def plan_problems(config: ModelConfig, groups: dict[str, list[int]], rope_layers: list[int]) -> list[str]:
    """``layers_apart``'s answer as problems: "layers 0-15: sliding window ...", and the RoPE line."""
    problems = [f"{layer_ranges(layers)}: {what}" for what, layers in groups.items()]
    if rope_layers:
        problems.append(f"{layer_ranges(rope_layers)}: a RoPE other than the model's ({config.rope})")
    return problems

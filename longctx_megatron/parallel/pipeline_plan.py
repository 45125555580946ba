"""Pipeline stages: a cost-balanced split of the layer plan, or one given by the user.

Sliding, dilated and full layers cost different amounts at a given sequence length (a full layer
at 100K tokens attends to ~50K keys per query, a sliding one to 4K), so stages are balanced by
each layer's forward FLOPs from the config (the head's cost is charged to the last stage), not by
layer count. The schedule that runs the stages is parallel/pipeline_schedule.py.
"""

from __future__ import annotations

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.model_config import ModelConfig
from longctx_megatron.model.counting import head_forward_flops, layer_forward_flops


def balanced_split(costs: list[float], stages: int, last_extra: float = 0.0) -> list[int]:
    """Layers per stage (contiguous, each >= 1) minimising the most expensive stage.

    ``last_extra`` is work only the last stage does (final norm, logits, loss). Exact dynamic
    programme over split points: O(stages * layers^2), instant for any real depth.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ConfigError(f"pipeline-model-parallel size {stages} needs between 1 and n_layers={n} stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    # best[s][i]: minimal max-stage cost placing the first i layers on s stages; cut[s][i]: last stage start.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            extra = last_extra if (s == stages and i == n) else 0.0
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, end = [], n
    for s in range(stages, 0, -1):
        start = cut[s][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def parse_split(text: str, n_layers: int, stages: int) -> list[int]:
    """``--pipeline-layer-split 10,8,7,7``: layers per stage, checked against the model and layout."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--pipeline-layer-split {text!r} must be comma-separated layer counts") from None
    if len(sizes) != stages or any(size < 1 for size in sizes) or sum(sizes) != n_layers:
        raise ConfigError(
            f"--pipeline-layer-split {text!r} must give {stages} positive layer counts (one per pipeline "
            f"stage) adding up to n_layers={n_layers}"
        )
    return sizes


def stage_costs(sizes: list[int], costs: list[float], last_extra: float = 0.0) -> list[float]:
    totals, start = [], 0
    for size in sizes:
        totals.append(sum(costs[start:start + size]))
        start += size
    totals[-1] += last_extra
    return totals


def plan_pipeline(config: ModelConfig, stages: int, seq_len: int, override: str | None = None):
    """(layers per stage, per-layer costs, head cost): the override if given, else the balanced split."""
    costs = layer_forward_flops(config, seq_len)
    head = head_forward_flops(config)
    sizes = parse_split(override, config.n_layers, stages) if override else balanced_split(costs, stages, head)
    return sizes, costs, head


def describe_split(config: ModelConfig, sizes: list[int], costs: list[float], head: float) -> str:
    """One line per stage: its layers, their patterns and its share of the cost (printed at start-up)."""
    plan, totals, start, lines = config.layer_plan(), stage_costs(sizes, costs, head), 0, []
    for stage, (size, total) in enumerate(zip(sizes, totals, strict=True)):
        kinds = {}
        for spec in plan[start:start + size]:
            kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
        mix = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        extras = (" + embedding" if stage == 0 else "") + (" + head" if stage == len(sizes) - 1 else "")
        lines.append(f"stage {stage}: layers {start}-{start + size - 1} ({mix}{extras}), "
                     f"{total / sum(totals):.1%} of the FLOPs")
        start += size
    return "\n".join(lines)


def stage_layers(sizes: list[int], stage: int) -> range:
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])

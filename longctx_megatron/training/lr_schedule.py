"""Learning rate as Megatron-LM's OptimizerParamScheduler computes it: linear warm-up from 0, then
constant, linear, cosine or inverse-square-root decay to ``min_lr``.

Megatron counts the schedule in samples: ``num_steps`` is the number of samples of the updates applied
so far (skipped updates do not count), warm-up and decay are sample counts (iterations x the global
batch when given in iterations), and the first update uses ``num_steps`` 0: learning rate 0 when
there is a warm-up. With a constant global batch, counting updates instead of samples gives the same
values (``step``, the samples per update, scales all three alike).
"""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def learning_rate(num_steps: float, lr: float, min_lr: float, warmup: float, decay: float, style: str) -> float:
    """The learning rate after ``num_steps`` units of applied updates (``warmup``, ``decay`` in the same unit)."""
    if style not in DECAY_STYLES:
        raise ValueError(f"--lr-decay-style {style!r} is unknown; choose one of {', '.join(DECAY_STYLES)}")
    if warmup > 0 and num_steps <= warmup:
        return lr * num_steps / warmup
    if style == "constant":
        return lr
    if num_steps > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, lr * max(warmup, 1) ** 0.5 / max(num_steps, 1) ** 0.5)
    ratio = (num_steps - warmup) / (decay - warmup)
    factor = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + (lr - min_lr) * factor

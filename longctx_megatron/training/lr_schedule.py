"""Learning rate: linear warm-up from 0, then constant, linear or cosine decay to ``min_lr`` (Megatron-LM)."""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine")


def learning_rate(iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str) -> float:
    """The learning rate of ``iteration`` (0-based: the first update uses iteration 0)."""
    if style not in DECAY_STYLES:
        raise ValueError(f"--lr-decay-style {style!r} is unknown; choose one of {', '.join(DECAY_STYLES)}")
    if warmup_iters > 0 and iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if style == "constant":
        return lr
    if iteration >= decay_iters:
        return min_lr
    progress = (iteration - warmup_iters) / max(1, decay_iters - warmup_iters)
    if style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (math.cos(math.pi * progress) + 1.0)
    return min_lr + (lr - min_lr) * factor

"""Learning rate: linear warm-up from 0, then constant, linear or cosine decay to ``min_lr`` (Megatron-LM)."""

from __future__ import annotations

import math

DECAY_STYLES = ("constant", "linear", "cosine")


def learning_rate(iteration: int, lr: float, min_lr: float, warmup: int, decay: int, style: str,
                  step: int = 1) -> float:
    """The learning rate of ``iteration`` (0-based: the first update uses iteration 0). ``warmup`` and
    ``decay`` count units of which each iteration trains ``step``: iterations (1), or samples (the
    global batch) when training is given in samples, as Megatron's scheduler counts them."""
    if style not in DECAY_STYLES:
        raise ValueError(f"--lr-decay-style {style!r} is unknown; choose one of {', '.join(DECAY_STYLES)}")
    done = iteration * step
    if warmup > 0 and done + step <= warmup:
        return lr * (done + step) / warmup
    if style == "constant":
        return lr
    if done >= decay:
        return min_lr
    progress = max(0.0, (done - warmup) / max(1, decay - warmup))
    if style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (math.cos(math.pi * progress) + 1.0)
    return min_lr + (lr - min_lr) * factor

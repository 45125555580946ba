"""Vocabulary padding, as Megatron-LM's make-vocab-size-divisible-by: one definition for all users."""

from __future__ import annotations

import math

VOCAB_PADDING_MULTIPLE = 128  # per tensor-parallel rank


def padded_vocab_size(vocab_size: int, tp_size: int = 1, divisible_by: int = VOCAB_PADDING_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of ``divisible_by`` x ``tp_size`` (so every TP shard is whole)."""
    multiple = divisible_by * tp_size
    return math.ceil(vocab_size / multiple) * multiple

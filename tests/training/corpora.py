"""Tiny indexed corpora for the training tests."""

from __future__ import annotations

import numpy as np

from longctx_megatron.data.indexed_dataset import building_dataset

PACKED_VOCAB = 96  # the packed corpus' NullTokenizer ids; its EOD is id 96


def write_eod_corpus(prefix: str, vocab: int, count: int, max_length: int, seed: int) -> str:
    """``count`` documents of 2 .. max_length - 1 random NullTokenizer ids below ``vocab``, each ending
    in its EOD (id ``vocab``), so every short sample packs several documents; returns ``prefix``."""
    rng = np.random.default_rng(seed)
    with building_dataset(prefix, np.int32) as builder:
        for _ in range(count):
            builder.add_document([rng.integers(0, vocab, rng.integers(2, max_length)).tolist() + [vocab]])
    return prefix

"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest

from tests.training.corpora import PACKED_VOCAB, write_eod_corpus


@pytest.fixture(scope="module")
def packed_corpus(tmp_path_factory) -> str:
    """Documents of 2-40 tokens, each ending in EOD: every 64-token sample packs several."""
    return write_eod_corpus(str(tmp_path_factory.mktemp("packed") / "docs"), PACKED_VOCAB, count=300, max_length=40,
                            seed=1)

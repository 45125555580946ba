"""A checkpoint for the inference and evaluation tools: a few iterations of the checkpoint tests'
small mixed-attention model, saved under TP2 x PP2 (so every load reshards), byte tokenizer."""

from __future__ import annotations

import pytest

from tests.checkpoint.helpers import train
from tests.distributed import run_on_ranks

TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("native") / "ckpt")
    run_on_ranks(train, 4, TP2_PP2 + ["--train-iters", "2", "--save", root], timeout=300)
    return root

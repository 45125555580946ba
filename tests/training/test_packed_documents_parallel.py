"""--reset-attention-mask under tensor, sequence and pipeline parallelism: the document boundaries
travel with every micro-batch to every stage, and the losses equal the single-process run's."""

from __future__ import annotations

import pytest

from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import setup
from tests.distributed import run_on_ranks
from tests.flags import LLAMA_ARCHITECTURE
from tests.training.corpora import PACKED_VOCAB as VOCAB


def _flags(prefix: str, *extra: str) -> list[str]:
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--split", "90,10,0", "--seq-length", "64", "--num-layers", "4", "--hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "128",
            "--sliding-window", "16", "--global-every", "8", "--dilated-window", "8", "--dilation", "2",
            "--attention-layout", "sliding:2,dilated:1,full:1", "--attention-backend", "chunked",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3", "--eval-iters", "1",
            "--log-interval", "3", *LLAMA_ARCHITECTURE, *extra]


def _losses(rank, world_size, flags) -> list[float]:
    return setup(parse_run_config(flags, world_size), log=lambda *_: None).train()


def _gap(losses, reference) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                    ["--pipeline-model-parallel-size", "2"]], ids=["tp2-sp", "pp2"])
def test_parallel_losses_with_document_masks_equal_one_process(packed_corpus, layout):
    masked = _flags(packed_corpus, "--reset-attention-mask", "--reset-position-ids")
    single = _losses(0, 1, masked)
    unmasked = _losses(0, 1, _flags(packed_corpus, "--reset-position-ids"))
    assert _gap(single, unmasked) > 1e-4  # the flag changes what attention sees: it is not ignored
    parallel = run_on_ranks(_losses, 2, masked + layout)
    last = parallel[-1]  # the last pipeline stage reports the loss (every rank does under TP)
    assert _gap(last, single) < 1e-5, (last, single)


def test_model_flops_follow_the_documents_of_each_batch():
    import torch

    from longctx_megatron.model.counting import flops_per_token
    from longctx_megatron.training.metrics import Metrics
    from longctx_megatron.training.run_config import demo_config

    run = parse_run_config(["--seq-length", "64"], 1)
    config = demo_config()
    metrics = Metrics(run, config, torch.device("cpu"), log=lambda *_: None)
    ids = torch.tensor([[0] * 10 + [1] * 54, [0] * 64])
    metrics.batches([{"tokens": torch.zeros(2, 64), "document_ids": ids}], dp_size=2)
    assert metrics.window_flops == 2 * 128 * flops_per_token(config, 64, documents=[[10, 54], [64]])
    metrics.begin(0)
    metrics.batches([{"tokens": torch.zeros(2, 64)}], dp_size=1)
    assert metrics.window_flops == 128 * flops_per_token(config, 64)

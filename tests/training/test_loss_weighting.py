"""Loss weighting: Megatron's default (mean of micro-batch token means) and --calculate-per-token-loss.

With loss masks (--eod-mask-loss) micro-batches hold different numbers of tokens in the loss, so
the default objective changes with --micro-batch-size and the DP size; the per-token loss (sum of
token losses / unmasked tokens of the global batch) does not.
"""

from __future__ import annotations

import pytest
import torch

from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import setup
from tests.distributed import run_on_ranks
from tests.flags import LLAMA_ARCHITECTURE
from tests.training.corpora import write_eod_corpus

VOCAB = 96  # NullTokenizer ids; its EOD is id 96


@pytest.fixture(scope="module")
def eod_dataset(tmp_path_factory) -> str:
    """Short documents of random lengths, each ending in EOD: every sample holds several masked EODs."""
    return write_eod_corpus(str(tmp_path_factory.mktemp("eod") / "docs"), VOCAB, count=400, max_length=30, seed=0)


def _flags(prefix: str, micro_batch: int, per_token: bool) -> list[str]:
    return ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
            "--eod-mask-loss", "--split", "90,10,0", "--seq-length", "64", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--ffn-hidden-size", "128",
            "--sliding-window", "16", "--global-every", "8",
            "--attention-layout", "sliding:1,full:1", "--attention-backend", "chunked",
            "--micro-batch-size", str(micro_batch), "--global-batch-size", "4", "--train-iters", "1",
            "--lr", "0", "--min-lr", "0", "--clip-grad", "0", "--eval-iters", "1", *LLAMA_ARCHITECTURE] + (
        ["--calculate-per-token-loss"] if per_token else [])


def _gradients(rank, world_size, flags) -> dict[str, torch.Tensor]:
    """The fp32 gradient of one global batch (left in main_grad after the step; lr 0 keeps the weights)."""
    trainer = setup(parse_run_config(flags, world_size), log=lambda *_: None)
    trainer.step(0)
    return {name: param.main_grad.clone() for chunk in trainer.chunks for name, param in chunk.named_parameters()}


def _max_gap(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-12)).item() for n in a)


@pytest.mark.slow
def test_per_token_loss_gradients_do_not_depend_on_micro_batch_or_dp_size(eod_dataset):
    runs = {}
    for per_token in (False, True):
        for micro in (1, 2):
            runs[per_token, micro, 1] = _gradients(0, 1, _flags(eod_dataset, micro, per_token))
        dp2 = run_on_ranks(_gradients, 2, _flags(eod_dataset, 1, per_token))
        assert _max_gap(dp2[0], dp2[1]) == 0.0  # DP replicas hold the same reduced gradient
        runs[per_token, 1, 2] = dp2[0]
    for micro, dp in ((2, 1), (1, 2)):
        for name, want in runs[True, 1, 1].items():
            torch.testing.assert_close(runs[True, micro, dp][name], want, rtol=1e-6, atol=1e-6,
                                       msg=lambda m, n=name, c=(micro, dp): f"micro-batch, DP {c}: {n}: {m}")
    # The default gives each micro-batch the same weight whatever its token count, so its gradient changes
    # with the micro-batch size (not with the DP size alone: a mean of micro-batch means either way).
    assert _max_gap(runs[False, 2, 1], runs[False, 1, 1]) > 1e-3
    assert _max_gap(runs[False, 1, 2], runs[False, 1, 1]) < 1e-6


def test_reported_loss_is_the_token_mean_of_the_global_batch_in_both_modes(eod_dataset):
    """As Megatron, the logged training and validation losses are sum of token losses / tokens over
    the global batch (and over all evaluation iterations), whatever the weighting of the gradients.
    One micro-batch of 4 samples is the reference: there every reduction is that token mean."""
    def losses(micro_batch: int, per_token: bool) -> tuple[float, float]:
        flags = _flags(eod_dataset, micro_batch, per_token) + ["--eval-iters", "2"]
        trainer = setup(parse_run_config(flags, 1), log=lambda *_: None)
        return trainer.step(0)[0], trainer.evaluate(1)

    reference = losses(4, False)
    for micro_batch, per_token in ((1, False), (1, True), (2, True), (4, True)):
        assert losses(micro_batch, per_token) == pytest.approx(reference, rel=1e-6), (micro_batch, per_token)

"""Exact resume (12 iterations straight = 6 + restart + 6) and resharding to other layouts, on gloo ranks."""

from __future__ import annotations

import pytest

from longctx_megatron.checkpoint import layout
from longctx_megatron.checkpoint.reader import CheckpointReader
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import setup
from tests.checkpoint.helpers import BASE, assert_same_tensors, rewind, tensors, train
from tests.distributed import run_on_ranks

TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [TP2_PP2, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]],
                         ids=["tp2xpp2", "tp2xdp2-zero1"])
def test_resume_is_bit_exact(tmp_path, flags):
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    straight = run_on_ranks(train, 4, flags + DROPOUT + ["--train-iters", "12", "--save", straight_dir,
                                                         "--save-interval", "6"], timeout=300)
    rewind(straight_dir, resumed_dir, 6)  # as if the job had died after iteration 6's checkpoint
    resumed = run_on_ranks(train, 4, flags + DROPOUT + ["--train-iters", "12", "--save", resumed_dir, "--load",
                                                        resumed_dir], timeout=300)
    for rank in range(4):
        assert resumed[rank] == straight[rank][6:]  # identical floats, not approximately equal
    final = layout.iteration_dir(straight_dir, 12), layout.iteration_dir(resumed_dir, 12)
    assert_same_tensors(tensors(final[0]), tensors(final[1]))  # weights, Adam moments, every rank's RNG
    metadata = [CheckpointReader(directory).metadata for directory in final]
    for meta in metadata:
        meta.pop("saved_at")
    assert metadata[0] == metadata[1]
    assert metadata[0]["iteration"] == 12 and metadata[0]["consumed_samples"] == 48


@pytest.fixture(scope="module")
def saved_at_tp2_pp2(tmp_path_factory):
    """A checkpoint of iteration 6 written under TP=2 x PP=2, and the losses of going on to iteration 7."""
    root = str(tmp_path_factory.mktemp("source") / "ckpt")
    losses = run_on_ranks(train, 4, TP2_PP2 + ["--train-iters", "7", "--save", root, "--save-interval", "6"],
                          timeout=300)
    return root, losses[0]


def _load_save_step(rank, world_size, flags, source, target):
    """Load iteration 6 under this layout, save it again at once, then train one iteration."""
    resume = ["--train-iters", "7", "--load", source, "--ckpt-step", "6", "--save", target]
    run = parse_run_config(BASE + flags + resume, world_size)
    trainer = setup(run, log=lambda *_: None)
    assert trainer.iteration == 6 and trainer.consumed_samples == 24
    trainer.save()
    trainer.checkpointer.wait()
    return trainer.step(6)[0]


RESHARD = {
    "tp1": (1, []),
    "tp4": (4, ["--tensor-model-parallel-size", "4"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
    "dp2": (2, []),
    "tp2xdp2-zero1": (4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]),
    "pp2-interleaved-sp": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                               "--num-layers-per-virtual-pipeline-stage", "2", "--sequence-parallel"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(RESHARD))
def test_reshard_on_load(tmp_path, saved_at_tp2_pp2, target):
    source, losses = saved_at_tp2_pp2
    world, flags = RESHARD[target]
    again = str(tmp_path / "again")
    next_losses = run_on_ranks(_load_save_step, world, flags, source, again, timeout=300)
    # Nothing was lost or moved: the new layout writes back exactly the tensors it loaded.
    assert_same_tensors(tensors(layout.iteration_dir(source, 6), "model/"),
                        tensors(layout.iteration_dir(again, 6), "model/"))
    assert_same_tensors(tensors(layout.iteration_dir(source, 6), "optimizer/"),
                        tensors(layout.iteration_dir(again, 6), "optimizer/"))
    for loss in next_losses:  # and the next step matches going on in the original layout
        assert loss == pytest.approx(losses[6], rel=1e-5)

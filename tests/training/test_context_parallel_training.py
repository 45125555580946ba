"""pretrain_longctx.py under context parallelism against one process: packed documents (so the
document rule crosses chunk boundaries), every layer kind, CP chunks equal to and shorter than the
window; CP2, CP4, CP2 x TP2 with sequence parallelism and full recomputation, CP2 x PP2 with
ZeRO-1 and selective recomputation, CP2 x interleaved PP2, CP2 x DP2 with ZeRO-1, both comm types;
bf16 within bf16's own spread of one bf16 process (or 1e-3); and a checkpoint saved under CP2
resumed under CP1 and the reverse (nothing lost, the same losses)."""

from __future__ import annotations

import pytest

from longctx_megatron.checkpoint import layout
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.setup import setup
from tests.checkpoint.helpers import assert_same_tensors, tensors
from tests.distributed import run_on_ranks
from tests.training.test_packed_documents_parallel import _flags as _packed_flags
from tests.training.test_packed_documents_parallel import _gap, _losses


def _flags(prefix: str, *extra: str) -> list[str]:
    # The packed-documents test's model: window 16 and dilated reach 8 x 2 = 16, so CP2's chunks (16)
    # equal them and CP4's (8) are shorter; with document masks and 5 iterations.
    return _packed_flags(prefix, "--reset-attention-mask", "--reset-position-ids", "--train-iters", "5",
                         "--log-interval", "5", *extra)


@pytest.fixture(scope="module")
def one_process(packed_corpus):
    return {precision: _losses(0, 1, _flags(packed_corpus, *flags)) for precision, flags in (("fp32", []),
                                                                                        ("bf16", ["--bf16"]))}


CP2 = ["--context-parallel-size", "2"]
LAYOUTS = {
    "cp2": (2, CP2),
    "cp2-allgather": (2, CP2 + ["--cp-comm-type", "allgather"]),
    "cp4": (4, ["--context-parallel-size", "4"]),
    "cp2xtp2-sp-recompute": (4, CP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                       "--recompute-granularity", "full"]),
    "cp2xpp2-zero1-recompute": (4, CP2 + ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
                                          "--recompute-granularity", "selective"]),
    "cp2xpp2-interleaved": (4, CP2 + ["--pipeline-model-parallel-size", "2",
                                      "--num-layers-per-virtual-pipeline-stage", "1"]),
    "cp2xdp2-zero1": (4, CP2 + ["--use-distributed-optimizer"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_equal_one_process(packed_corpus, one_process, name):
    world, flags = LAYOUTS[name]
    losses = run_on_ranks(_losses, world, _flags(packed_corpus, *flags), timeout=300)
    assert _gap(losses[-1], one_process["fp32"]) < 1e-5, (losses[-1], one_process["fp32"])


def test_bf16_is_as_close_as_bf16_allows(packed_corpus, one_process):
    spread = _gap(one_process["bf16"], one_process["fp32"])
    losses = run_on_ranks(_losses, 2, _flags(packed_corpus, "--bf16", *CP2), timeout=300)
    assert _gap(losses[0], one_process["bf16"]) <= max(spread, 1e-3), (losses[0], one_process["bf16"], spread)


def _load_save_step(rank, world_size, flags, source, target):
    """Load iteration 3, save it again at once, then train on to iteration 5."""
    trainer = setup(parse_run_config(flags + ["--load", source, "--ckpt-step", "3", "--save", target], world_size),
                    log=lambda *_: None)
    assert trainer.iteration == 3
    trainer.save()
    trainer.checkpointer.wait()
    return trainer.train()


@pytest.mark.parametrize("saved,loaded", [(2, 1), (1, 2)], ids=["cp2-to-cp1", "cp1-to-cp2"])
def test_resume_under_another_context_parallel_size(packed_corpus, tmp_path, saved, loaded):
    source, again = str(tmp_path / f"cp{saved}"), str(tmp_path / f"cp{loaded}")
    cp = {size: ["--context-parallel-size", str(size)] for size in (1, 2)}
    straight = run_on_ranks(_losses, saved, _flags(packed_corpus, *cp[saved], "--use-distributed-optimizer", "--save",
                                                   source, "--save-interval", "3"), timeout=300)[0]
    resumed = run_on_ranks(_load_save_step, loaded, _flags(packed_corpus, *cp[loaded], "--use-distributed-optimizer"),
                           source, again, timeout=300)[0]
    # Nothing lost or moved: the other CP size writes back exactly what was saved (weights, Adam moments).
    for prefix in ("model/", "optimizer/"):
        assert_same_tensors(tensors(layout.iteration_dir(source, 3), prefix),
                            tensors(layout.iteration_dir(again, 3), prefix))
    assert _gap(resumed, straight[3:]) < 1e-5, (resumed, straight[3:])

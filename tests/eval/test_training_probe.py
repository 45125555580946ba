"""--eval-longctx-interval: the grid scored during training equals tools/evaluate_longctx.py (one
process) on the checkpoint saved at that iteration, under one process (bf16), TP2 x PP2 with
sequence parallelism (fp32), and interleaved PP2 x DP2 (bf16); TensorBoard gets the scalars; bad
grids are named before any process group exists."""

from __future__ import annotations

import json

import evaluate_longctx
import pytest

import pretrain_longctx
from tests.checkpoint.helpers import BASE
from tests.distributed import run_on_ranks

GRID = ["--eval-longctx-lengths", "100", "--eval-longctx-depths", "0", "1", "--eval-longctx-tasks", "passkey"]
TOOL_GRID = ["--tokenizer-type", "ByteTokenizer", "--lengths", "100", "--depths", "0", "1", "--tasks", "passkey",
             "--no-progress"]


def _train(rank, world_size, flags):
    """Rank body: train with the probe every 2 iterations; returns the probe's history."""
    trainer = pretrain_longctx.build_trainer(BASE + GRID + ["--eval-longctx-interval", "2"] + flags,
                                             log=lambda *_: None)
    trainer.train()
    return trainer.probes[0].history


def _tool(rank, world_size, argv):
    return evaluate_longctx.main(argv, log=lambda *_: None)


def _tool_cells(checkpoint: str, step: int, tmp_path, flags: list[str]) -> dict:
    out = str(tmp_path / f"tool-{step}.json")
    [code] = run_on_ranks(_tool, 1, ["--load", checkpoint, "--ckpt-step", str(step), *TOOL_GRID, *flags,
                                     "--output-json", out])
    assert code == 0
    return {(c["task"], c["length"], c["depth"]): (c["accuracy"], c["mean_answer_logprob"])
            for c in json.load(open(out))["cells"]}


@pytest.mark.slow
@pytest.mark.parametrize("world,layout,dtype,samples", [
    (1, [], ["--bf16"], 2),
    # 6 cases over 2 tensor groups (data 1 x pipeline 2)
    (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"], [], 3),
    # 6 cases over 2 context-parallel ranks, each with the whole model
    (2, ["--context-parallel-size", "2"], [], 3),
    # 2 cases over 4 groups (data 2 x pipeline 2): two groups score none
    (4, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], ["--bf16"], 1),
])
def test_the_grid_during_training_equals_the_tool_on_that_checkpoint(world, layout, dtype, samples, tmp_path):
    root = str(tmp_path / "ckpt")
    histories = run_on_ranks(_train, world, layout + dtype + ["--eval-longctx-samples", str(samples),
                                                              "--train-iters", "4", "--save", root,
                                                              "--save-interval", "4"], timeout=600)
    assert all(history == histories[0] for history in histories)  # every rank has the same cells
    assert sorted(histories[0]) == [2, 4]
    probe, tool = histories[0][4], _tool_cells(root, 4, tmp_path, dtype + ["--samples", str(samples)])
    assert sorted(probe) == sorted(tool) == [("passkey", 100, 0.0), ("passkey", 100, 1.0)]
    for cell, (accuracy, logprob) in tool.items():
        assert probe[cell][0] == accuracy  # after 4 iterations, 0 everywhere: the log-likelihood is the check
        assert probe[cell][1] == pytest.approx(logprob, rel=1e-4 if not dtype else 2e-3), cell
    assert histories[0][2] != histories[0][4]  # the weights moved between the two grids


def test_scalars_reach_tensorboard_and_the_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = []
    pretrain_longctx.run(BASE + GRID + ["--train-iters", "2", "--eval-longctx-interval", "1",
                                        "--eval-longctx-samples", "1", "--tensorboard-dir", str(tmp_path / "tb")],
                         log=lines.append)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("retrieval/passkey/accuracy", "retrieval/passkey/answer_logprob", "retrieval/passkey/accuracy@100"):
        assert tag in tags
        assert [event.step for event in events.Scalars(tag)] == [1, 2]
    assert any(line.startswith("retrieval at iteration 2: passkey accuracy") and "L100@1" in line for line in lines)


@pytest.mark.parametrize("flags,message", [
    (["--eval-longctx-lengths", "5000"], "--eval-longctx-lengths: a passkey case of length 5000 needs 5010 positions"),
    (["--eval-longctx-lengths", "20"], "--eval-longctx-lengths: context length 20 is shorter than"),
    (["--eval-longctx-tasks", "ruler"], "--eval-longctx-tasks: unknown"),
    (["--eval-longctx-depths", "2"], "--eval-longctx-depths: 2.0 must be within"),
    (["--eval-longctx-samples", "0"], "--eval-longctx-samples must be >= 1"),
    (["--eval-longctx-interval", "-1"], "--eval-longctx-interval must be >= 0"),
    (["--eval-longctx-interval", "0", "--eval-longctx-samples", "3"],
     "--eval-longctx-samples needs --eval-longctx-interval"),
    (["--seq-length", "20"], r"--eval-longctx-lengths \(not given: 20, from --seq-length\): context length 20"),
])
def test_bad_grids_are_named_before_any_process_group(flags, message, monkeypatch):
    import longctx_megatron.training.setup as setup

    monkeypatch.setattr(setup, "initialize_parallel", lambda **_: pytest.fail("process groups were created"))
    with pytest.raises(ValueError, match=message):
        pretrain_longctx.build_trainer(BASE + ["--eval-longctx-interval", "2"] + flags, log=lambda *_: None)


def test_the_probe_changes_no_training_step():
    """Building the whole-stack copy must not touch training's random state: with dropout, the
    losses with a grid every iteration equal those without one."""
    flags = BASE + ["--train-iters", "3", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    plain = pretrain_longctx.run(flags, log=lambda *_: None)
    probed = pretrain_longctx.run(flags + GRID + ["--eval-longctx-interval", "1"], log=lambda *_: None)
    assert probed == plain

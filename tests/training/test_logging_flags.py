"""Megatron's logging flags: TensorBoard tags and intervals, --log-throughput, --log-params-norm and
--log-num-zeros-in-grad (against one process and under 2-rank TP, PP and ZeRO-1), --timing-log-level,
wandb (a stand-in module, and the real one offline when installed) and --profile."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import sys
import types

import pytest
import torch

import pretrain_longctx
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.timers import Timers, log_block
from tests.distributed import run_on_ranks

TINY = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "2", "--eval-iters", "1",
        "--attention-backend", "chunked"]


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_megatron_tags_every_tensorboard_interval(tmp_path):
    lines = []
    losses = pretrain_longctx.run(TINY + [
        "--train-iters", "4", "--log-interval", "4", "--tensorboard-log-interval", "2", "--eval-interval", "2",
        "--tensorboard-dir", str(tmp_path / "tb"), "--log-params-norm", "--log-num-zeros-in-grad",
        "--log-world-size-to-tensorboard", "--log-memory-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-timers-to-tensorboard", "--log-throughput", "--timing-log-level", "2"], log=lines.append)
    scalars = _scalars(tmp_path / "tb")
    for tag in ("lm loss", "learning-rate", "grad-norm", "loss-scale", "batch-size", "num-zeros", "params-norm",
                "world-size"):
        assert [step for step, _ in scalars[tag]] == [2, 4], tag  # every --tensorboard-log-interval
        assert [step for step, _ in scalars[f"{tag} vs samples"]] == [4, 8], tag  # x: consumed samples
    assert [value for _, value in scalars["lm loss"]] == pytest.approx([losses[1], losses[3]], rel=1e-6)
    assert [value for _, value in scalars["batch-size"]] == [2, 2]
    assert [value for _, value in scalars["world-size"]] == [1, 1]
    assert [value for _, value in scalars["loss-scale"]] == [1, 1]  # no fp16 scaler: Megatron's 1.0
    assert [step for step, _ in scalars["mem-max-rss-bytes"]] == [2, 4]  # CPU: no CUDA memory stats
    assert not any(tag.startswith("mem-allocated") for tag in scalars)
    validation = scalars["lm loss validation"]
    assert [step for step, _ in validation] == [2, 4, 4]  # at --eval-interval (4 too) and after training, as Megatron
    assert [value for _, value in scalars["lm loss validation ppl"]] == pytest.approx(
        [math.exp(value) for _, value in validation], rel=1e-5)
    assert [step for step, _ in scalars["lm loss validation ppl vs samples"]] == [4, 8, 8]
    for tag in ("iteration-time", "throughput", "forward-backward-time", "optimizer-time", "all-grads-sync-time",
                "batch-generator-time", "forward-compute-time", "backward-compute-time"):
        assert [step for step, _ in scalars[tag]] == [4], tag  # timers: every --log-interval
    assert scalars["forward-compute-time"][0][1] < scalars["forward-backward-time"][0][1]
    assert not any(tag.startswith(("train/", "validation/")) for tag in scalars)  # the old names are gone

    step = next(line for line in lines if line.startswith("iteration      4/4"))
    assert "throughput per GPU (TFLOP/s/GPU): " in step and "TFLOP/s per device" not in step
    assert "| params norm " in step and "| num zeros " in step
    block = lines[lines.index(step) + 1].splitlines()
    assert block[0] == "(min, max) time across ranks (ms):"
    timed = [line.split(" .")[0].strip() for line in block[1:]]
    assert timed == ["forward-backward", "all-grads-sync", "optimizer-clip-main-grad", "optimizer-count-zeros",
                     "optimizer-inner-step", "optimizer", "batch-generator", "forward-compute", "backward-compute"]


def test_the_defaults_write_only_what_megatron_writes_by_default(tmp_path):
    lines = []
    pretrain_longctx.run(TINY + ["--train-iters", "2", "--log-interval", "1", "--tensorboard-dir", str(tmp_path / "tb"),
                                 "--no-log-loss-scale-to-tensorboard"], log=lines.append)
    scalars = _scalars(tmp_path / "tb")
    assert sorted(tag for tag in scalars if not tag.endswith(" vs samples")) == [
        "batch-size", "grad-norm", "learning-rate", "lm loss", "lm loss validation"]
    assert [step for step, _ in scalars["lm loss"]] == [1, 2]  # --tensorboard-log-interval defaults to 1
    steps = [line for line in lines if line.startswith("iteration")]
    assert len(steps) == 2 and all("TFLOP/s per device" in line and "params norm" not in line for line in steps)
    assert not any("time across ranks" in line for line in lines)  # --timing-log-level 0


def test_timer_levels_and_megatron_format():
    timers = Timers(level=1)
    with timers("forward-backward", 1):
        pass
    with timers("batch-generator", 2):  # above the level: not measured
        pass
    assert list(timers.seconds) == ["forward-backward"]
    times = timers.min_max(iterations=1)
    assert list(times) == ["forward-backward"] and timers.seconds == {}
    assert log_block({"forward-backward": (0.0123, 0.02), "optimizer": (0.001, 0.001)}) == (
        "(min, max) time across ranks (ms):\n"
        "    forward-backward ...............................: (12.30, 20.00)\n"
        "    optimizer ......................................: (1.00, 1.00)")
    assert log_block({}) is None and Timers(level=0).min_max(1) == {}


# --log-params-norm and --log-num-zeros-in-grad. Untied embeddings: the rows of tokens a batch lacks get
# no gradient, so there are zeros to count (with tied ones the output layer touches every row).
STATS = TINY + ["--train-iters", "1", "--log-interval", "1", "--log-params-norm", "--log-num-zeros-in-grad"]
UNTIED = ["--untie-embeddings-and-output-weights"]


def _statistics(rank, world_size, flags):
    """(params norm, num zeros, rank 0's log) after one training iteration; the norm and zeros as the trainer
    computes them, plus the norm computed again after training (both ranks take part: collectives)."""
    from longctx_megatron.training.optimizer_stats import params_norm
    from longctx_megatron.training.setup import setup

    lines = []
    trainer = setup(parse_run_config(flags, world_size), log=lines.append)
    trainer.train()
    return params_norm(trainer.optimizer, trainer.chunks, trainer.ctx), trainer.num_zeros, lines


def test_params_norm_and_zeros_match_a_direct_count():
    from longctx_megatron.training.setup import setup

    lines = []
    trainer = setup(parse_run_config(STATS + UNTIED, 1), log=lines.append)
    trainer.train()
    params = [p for chunk in trainer.chunks for p in chunk.parameters()]
    expected_norm = torch.cat([p.detach().double().flatten() for p in params]).norm().item()
    expected_zeros = sum(int((p.main_grad == 0).sum()) for p in params)
    assert expected_zeros > 1000  # the embedding rows of absent tokens
    assert trainer.num_zeros == expected_zeros
    step = next(line for line in lines if line.startswith("iteration"))
    assert f"params norm {expected_norm:.3f} | num zeros {expected_zeros} |" in step


@pytest.mark.parametrize("layout,common", [
    (["--tensor-model-parallel-size", "2"], UNTIED),  # vocabulary-parallel embedding, replicated norms (1/tp)
    (["--pipeline-model-parallel-size", "2"], ["--timing-log-level", "2"]),  # the tied embedding on both stages
    (["--use-distributed-optimizer"], UNTIED),  # ZeRO-1 over DP 2: each rank holds a shard of the gradients
], ids=["tp2", "pp2-tied", "zero1-dp2"])
def test_params_norm_and_zeros_under_two_ranks_equal_one_process(layout, common):
    single = _statistics(0, 1, STATS + common)
    ranks = run_on_ranks(_statistics, 2, STATS + common + layout)
    for norm, zeros, _ in ranks:
        assert norm == pytest.approx(single[0], rel=1e-6)
        assert zeros == single[1]
    if common == UNTIED:
        assert single[1] > 1000
    step = next(line for line in ranks[0][2] if line.startswith("iteration"))
    assert f"params norm {single[0]:.3f} | num zeros {single[1]} |" in step
    if "--timing-log-level" in common:  # rank 0 (the first stage) gathers the last stage's timers too
        timed = ranks[0][2][ranks[0][2].index(step) + 1]
        assert "forward-recv" in timed and "backward-recv" in timed


class _FakeWandb(types.ModuleType):
    """A stand-in for the wandb module that records what Metrics gives it."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, values, step=None):
        self.logged.extend((key, step, value) for key, value in values.items())

    def finish(self):
        self.finished += 1


def test_wandb_gets_the_same_scalars(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    losses = pretrain_longctx.run(TINY + ["--train-iters", "2", "--log-interval", "1", "--wandb-project", "proj",
                                          "--wandb-exp-name", "exp", "--wandb-save-dir", str(tmp_path / "w"),
                                          "--log-params-norm"], log=lambda *_: None)
    assert len(fake.inits) == 1 and fake.finished == 1
    init = fake.inits[0]
    assert (init["project"], init["name"], init["dir"]) == ("proj", "exp", str(tmp_path / "w"))
    assert init["config"]["training"]["seq_length"] == 64 and "entity" not in init
    keys = {key for key, _, _ in fake.logged}
    assert keys == {"samples vs steps", "learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm",
                    "params-norm", "lm loss validation"}  # no " vs samples" variants, as Megatron
    assert [(step, value) for key, step, value in fake.logged if key == "lm loss"] == [(1, losses[0]), (2, losses[1])]
    assert [(step, value) for key, step, value in fake.logged if key == "samples vs steps"] == [(1, 2), (2, 4)]


def test_wandb_missing_is_named_before_any_process_group(monkeypatch, capsys):
    import longctx_megatron.training.setup as setup

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(setup, "initialize_parallel", lambda **_: pytest.fail("process groups were created"))
    with pytest.raises(ValueError, match="--wandb-project needs the wandb package .*: pip install wandb"):
        setup.setup(parse_run_config(["--wandb-project", "p"], 1))
    assert pretrain_longctx.main(["--wandb-project", "p"]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_real_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain_longctx.run(TINY + ["--train-iters", "1", "--wandb-project", "proj", "--wandb-save-dir", str(tmp_path)],
                         log=lambda *_: None)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_profile_writes_a_trace_where_megatron_does(tmp_path):
    lines = []
    pretrain_longctx.run(TINY + ["--train-iters", "3", "--profile", "--use-pytorch-profiler", "--profile-step-start",
                                 "1", "--profile-step-end", "3", "--tensorboard-dir", str(tmp_path / "run" / "tb")],
                         log=lines.append)
    trace = tmp_path / "run" / "torch_profile" / "rank-0.json.gz"
    assert f"profile trace written to {trace}" in lines
    with gzip.open(trace, "rt") as file:
        events = json.load(file)["traceEvents"]
    steps = sorted({event["name"] for event in events if event.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]  # iterations 1 and 2 of [1, 3), Megatron's schedule


def test_profile_needs_a_tensorboard_dir_and_follows_profile_ranks(tmp_path, monkeypatch):
    import longctx_megatron.training.setup as setup

    with monkeypatch.context() as patch:
        patch.setattr(setup, "initialize_parallel", lambda **_: pytest.fail("process groups were created"))
        with pytest.raises(ValueError, match="--profile --use-pytorch-profiler needs --tensorboard-dir"):
            setup.setup(parse_run_config(["--profile", "--use-pytorch-profiler"], 1))
    pretrain_longctx.run(TINY + ["--train-iters", "2", "--profile", "--use-pytorch-profiler",
                                 "--profile-step-start", "0", "--profile-step-end", "1", "--profile-ranks", "1",
                                 "--tensorboard-dir", str(tmp_path / "tb")], log=lambda *_: None)
    assert not (tmp_path / "torch_profile").exists()  # rank 0 is not in --profile-ranks


def test_cuda_memory_tags_come_from_torch_cuda_memory_stats(monkeypatch):
    """No GPU here: the CUDA branch is fed a stand-in for torch.cuda.memory_stats (Megatron's four keys)."""
    from longctx_megatron.config import ModelConfig
    from longctx_megatron.training.metrics import Metrics

    stats = {"reserved_bytes.all.current": 4096, "allocated_bytes.all.current": 1024,
             "allocated_bytes.all.peak": 2048, "allocation.all.current": 7}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: stats)
    written = []
    writer = types.SimpleNamespace(add_scalar=lambda tag, value, step: written.append((tag, value, step)))
    run = parse_run_config(["--log-memory-to-tensorboard", "--tensorboard-dir", "unused", "--peak-tflops", "1",
                            "--train-iters", "10"], 1)
    metrics = Metrics(run, ModelConfig(d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=128, vocab_size=64),
                      torch.device("cuda"), log=lambda *_: None, writer=writer)
    metrics.iteration(1, 2, 1e-3, 3.0, 1.0, 0, None)  # not a log iteration: no CUDA call beyond the stats
    memory = {tag: value for tag, value, _ in written if tag.startswith("mem-")}
    assert memory == {"mem-reserved-bytes": 4096, "mem-allocated-bytes": 1024, "mem-max-allocated-bytes": 2048,
                      "mem-allocated-count": 7}


def test_profile_alone_is_megatrons_nsight_range(tmp_path, monkeypatch):
    """--profile without --use-pytorch-profiler: cudaProfilerStart at the top of --profile-step-start and
    cudaProfilerStop at the top of --profile-step-end (a stand-in cudart: no GPU here); on CPU, said once."""
    import types as module_types

    from longctx_megatron.training.profiling import NsysRange

    calls = []
    cudart = module_types.SimpleNamespace(cudaProfilerStart=lambda: calls.append("start"),
                                          cudaProfilerStop=lambda: calls.append("stop"))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.autograd.profiler, "emit_nvtx", lambda **_: contextlib.nullcontext())
    run = parse_run_config(["--profile", "--profile-step-start", "2", "--profile-step-end", "4"], 1)
    marks = NsysRange(run, torch.device("cuda"), log=pytest.fail)
    for iteration in range(6):
        marks.step(iteration)
        calls.append(iteration)
    assert calls == [0, 1, "start", 2, 3, "stop", 4, 5]
    lines = []
    pretrain_longctx.run(TINY + ["--train-iters", "2", "--profile", "--tensorboard-dir", str(tmp_path / "tb")],
                         log=lines.append)
    assert sum("marks an Nsight Systems range on CUDA" in line for line in lines) == 1
    assert not (tmp_path / "torch_profile").exists()

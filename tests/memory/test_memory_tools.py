"""The memory model's answers: the start-up check of pretrain_longctx.py and tools/estimate_memory.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch.distributed as dist

import pretrain_longctx
from longctx_megatron.memory.estimate import estimate_training
from longctx_megatron.memory.planner import largest_fitting, peak, rank_layouts
from longctx_megatron.memory.report import GIB
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.memory_check import training_setup
from longctx_megatron.training.setup import stage_sizes, tokenizer_and_model
from tests.flags import LLAMA_ARCHITECTURE
from tools import estimate_memory

# The 7B example's model and layout (examples/pretrain_longctx_7b.sh) without its data files.
SEVEN_B = ["--tensor-model-parallel-size", "8", "--sequence-parallel", "--bf16", "--use-distributed-optimizer",
           "--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--num-query-groups", "8",
           "--ffn-hidden-size", "11008", *LLAMA_ARCHITECTURE, "--attention-layout", "sliding:16,dilated:12,full:4",
           "--sliding-window", "4096", "--global-every", "128", "--dilated-window", "1024", "--dilation", "4",
           "--max-position-embeddings", "102400", "--seq-length", "102400", "--micro-batch-size", "1",
           "--global-batch-size", "8", "--vocab-size", "32000"]


def _setup(flags, world=8):
    run = parse_run_config(flags, world)
    _, config = tokenizer_and_model(run)
    return training_setup(run, config, stage_sizes(run, config)[0], "cuda")


def test_pretrain_refuses_a_run_that_cannot_fit_before_any_process_group(capsys):
    assert pretrain_longctx.main(["--train-iters", "1", "--memory-per-device", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "GiB per process" in error and "largest terms: activations" in error and "--recompute-granularity" in error
    assert not dist.is_initialized()


def test_pretrain_prints_the_estimate_at_start_up():
    lines = []
    pretrain_longctx.run(["--train-iters", "1", "--seq-length", "256", "--eval-iters", "1"], log=lines.append)
    assert any(line.startswith("memory per process (estimate, GiB): pipeline rank 0") for line in lines)


def test_estimate_terms_respond_to_the_layout():
    base = _setup(SEVEN_B)
    selective = estimate_training(dataclasses.replace(base, recompute="selective"))[0]
    full = estimate_training(dataclasses.replace(base, recompute="full"))[0]
    assert full.total < selective.total < estimate_training(base)[0].total
    half = estimate_training(dataclasses.replace(base, seq_length=51200))[0]
    assert half.terms["weights"] == selective.terms["weights"]  # model states do not depend on the length
    plain = dataclasses.replace(base, distributed_optimizer=False, element=4)
    assert "optimizer (AdamW moments)" in estimate_training(plain)[0].terms
    stages = estimate_training(dataclasses.replace(base, pipeline=4, microbatches=8, stage_sizes=None))
    assert len(stages) == 4 and stages[0].total > stages[-1].total - stages[-1].terms.get(
        "activations: head (final norm, logits)", 0)  # 1F1B: the first stage holds the most micro-batches


def test_largest_sequence_length_fits_and_the_next_step_does_not():
    base = _setup(SEVEN_B + ["--recompute-granularity", "selective"])
    capacity = 80 * GIB
    longest = largest_fitting(base, capacity, "seq_length", 1024)
    assert longest > 0
    assert peak(dataclasses.replace(base, seq_length=longest)) <= capacity
    assert peak(dataclasses.replace(base, seq_length=longest + 1024)) > capacity


def test_ranked_layouts_all_fit_and_respect_the_model():
    base = _setup(SEVEN_B)
    ranked = rank_layouts(base, 8, 8, 80 * GIB)
    assert ranked and [layout.seconds for layout in ranked] == sorted(layout.seconds for layout in ranked)
    for layout in ranked:
        s = layout.setup
        assert layout.peak <= 80 * GIB and s.tensor * s.pipeline * s.context * s.data == 8 and 8 % s.tensor == 0


def test_estimate_memory_tool(capsys):
    assert estimate_memory.main(SEVEN_B + ["--recompute-granularity", "selective", "--memory-per-device", "80",
                                           "--largest", "seq-length"]) == 0
    out = capsys.readouterr().out
    assert "pipeline rank 0" in out and "activations: sliding layers" in out and "largest seq-length that fits" in out
    assert estimate_memory.main(SEVEN_B + ["--inference", "--batch", "8"]) == 0
    assert "kv cache" in capsys.readouterr().out.lower()
    assert estimate_memory.main(["--num-layers", "2", "--largest", "micro-batch"]) == 2


def test_estimate_memory_tool_refuses_what_it_cannot_answer(capsys):
    assert estimate_memory.main(["--tensor-model-parallel-size", "4"]) == 2  # the demo model has 2 KV heads
    assert "must divide n_kv_heads" in capsys.readouterr().err
    assert estimate_memory.main(["--inference", "--pipeline-model-parallel-size", "2"]) == 2
    assert estimate_memory.main(["--inference", "--tensor-model-parallel-size", "4"]) == 2
    assert estimate_memory.main(["--memory-per-device", "-1"]) == 2
    with pytest.raises(SystemExit):
        estimate_memory.main(["--inference", "--prefill-chunk", "0"])
    assert estimate_memory.main(["--reset-attention-mask", "--attention-backend", "reference", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "packed documents (--reset-attention-mask) are not modelled" in out
    assert "--attention-backend reference on cpu is not modelled" in out


def test_memory_per_device_zero_turns_the_check_off():
    assert pretrain_longctx.main(["--train-iters", "1", "--seq-length", "128", "--eval-iters", "1",
                                  "--memory-per-device", "0"]) == 0

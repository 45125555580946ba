"""examples/pretrain_tiny_cpu.sh (the README's main job) end to end, reduced: 4 CPU processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_example_runs_and_learns(tmp_path):
    env = dict(os.environ, WORKDIR=str(tmp_path / "run"), TRAIN_ITERS="12", SEQ_LENGTH="128", VOCAB="600",
               PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "examples" / "pretrain_tiny_cpu.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 12 iterations", result.stdout).groups())
    assert last < first - 0.5
    assert "validation at iteration 12" in result.stdout
    assert "tensor 2 x pipeline 2 x data 1" in result.stdout
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "12\n"


def test_7b_example_flags_describe_the_design_model():
    """The 8-GPU script's flags parse, pass the start-up checks for 8 ranks and build the 7B design."""
    from longctx_megatron.config import ModelConfig
    from longctx_megatron.model.counting import estimate_params
    from longctx_megatron.training.arguments import parse_run_config

    script = (ROOT / "examples" / "pretrain_longctx_7b.sh").read_text()
    command = script[script.index("pretrain_longctx.py") + len("pretrain_longctx.py"):].replace("\\\n", " ")
    flags = command.replace('"$DATA"', "corpus").replace('"$TOKENIZER"', "tok.model")
    flags = flags.replace('"$OUT/tensorboard"', "tb").replace('"$OUT/checkpoints"', "ckpt").split()
    run = parse_run_config(flags, world_size=8)
    config = run.model.resolve(ModelConfig(), run.training.seq_length)
    assert estimate_params(config) == 5_802_037_248
    assert [spec.kind for spec in config.layer_plan()].count("full") == 4
    assert run.training.seq_length == 102400 and run.parallel.tensor == 8
    ckpt = run.checkpointing
    assert ckpt.save == ckpt.load == "ckpt" and ckpt.async_save  # resumable as launched

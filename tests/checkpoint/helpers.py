"""Shared pieces of the checkpoint tests: a small mixed-attention model's flags, and whole-checkpoint reads."""

from __future__ import annotations

import os
import shutil

import torch

import pretrain_longctx
from longctx_megatron.checkpoint import layout
from longctx_megatron.checkpoint.reader import CheckpointReader

BASE = ["--seq-length", "128", "--micro-batch-size", "1", "--global-batch-size", "4", "--num-layers", "8",
        "--attention-layout", "sliding:4,dilated:2,full:2", "--attention-backend", "chunked",
        "--num-query-groups", "4", "--lr-warmup-iters", "2", "--log-interval", "100", "--eval-iters", "1"]


def train(rank, world_size, flags):
    """Rank body: run the trainer with BASE + flags; returns this process's losses."""
    return pretrain_longctx.run(BASE + flags, log=lambda *_: None)


def tensors(directory: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every global tensor of a checkpoint directory whose name starts with ``prefix``."""
    reader = CheckpointReader(directory)
    out = {name: reader.read_global(name).clone() for name in reader.names() if name.startswith(prefix)}
    reader.close()
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def rewind(source: str, target: str, iteration: int) -> None:
    """Copy checkpoint root ``source`` to ``target`` keeping only checkpoints up to ``iteration``."""
    shutil.copytree(source, target)
    for found in layout.list_iterations(target):
        if found > iteration:
            shutil.rmtree(layout.iteration_dir(target, found))
    layout.write_tracker(target, iteration)
    assert os.path.isdir(layout.iteration_dir(target, iteration))

"""Damaged, missing and incompatible checkpoints; crashes during a save; what --load's options restore."""

from __future__ import annotations

import os

import pytest
import torch

import pretrain_longctx
from longctx_megatron.checkpoint import layout, sharded
from longctx_megatron.checkpoint.compatibility import check_compatible
from longctx_megatron.checkpoint.errors import CheckpointError
from longctx_megatron.checkpoint.reader import verify_files
from longctx_megatron.config.serialization import config_to_dict
from longctx_megatron.training.arguments import parse_run_config
from longctx_megatron.training.run_config import demo_config
from longctx_megatron.training.setup import setup
from tests.checkpoint.helpers import BASE, tensors


def _run(flags, lines=None):
    return pretrain_longctx.run(BASE + flags, log=lines.append if lines is not None else lambda *_: None)


@pytest.fixture
def root(tmp_path):
    """Checkpoints of iterations 2 and 4."""
    path = str(tmp_path / "ckpt")
    _run(["--train-iters", "4", "--save", path, "--save-interval", "2"])
    assert layout.list_iterations(path) == [4, 2] and layout.read_tracker(path) == 4
    return path


def _damage(path: str, how: str) -> str:
    shard = os.path.join(path, layout.shard_file(0))
    if how == "truncated":
        os.truncate(shard, os.path.getsize(shard) // 2)
        return "bytes, the manifest says"
    if how == "deleted":
        os.remove(shard)
        return "shard_00000.safetensors is missing"
    if how == "flipped byte":
        with open(shard, "r+b") as file:
            file.seek(os.path.getsize(shard) - 100)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
        return "does not match its CRC-32"
    os.remove(os.path.join(path, layout.MANIFEST))  # a directory renamed without its manifest
    return "manifest.json is missing"


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped byte", "no manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(root, how):
    expected = _damage(layout.iteration_dir(root, 4), how)
    lines = []
    losses = _run(["--train-iters", "5", "--load", root], lines)
    text = "\n".join(lines)
    assert len(losses) == 3  # iterations 3, 4, 5: resumed after iteration 2
    assert "warning: skipped a newer checkpoint" in text and expected in text
    assert f"resumed from {layout.iteration_dir(root, 2)}: iteration 2, consumed samples 8" in text


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(root):
    for iteration in (2, 4):
        _damage(layout.iteration_dir(root, iteration), "deleted")
    with pytest.raises(CheckpointError, match="no sound checkpoint in .*iter_0000004.* is missing"):
        _run(["--train-iters", "5", "--load", root])


def test_crash_during_save_keeps_the_previous_checkpoint_and_tracker(root, monkeypatch):
    real = sharded.write_safetensors

    def dies_half_way(path, tensors_, *args):
        if "0000006" in path:
            with open(path, "wb") as file:
                file.write(b"\0" * 1000)
            raise OSError("No space left on device")
        return real(path, tensors_, *args)

    monkeypatch.setattr(sharded, "write_safetensors", dies_half_way)
    with pytest.raises(CheckpointError, match="saving iteration 6 failed; the previous checkpoint is intact: rank 0 "
                                              "could not write shard_00000.safetensors: No space left on device"):
        _run(["--train-iters", "6", "--load", root, "--save", root, "--save-interval", "2"])
    assert layout.read_tracker(root) == 4 and layout.list_iterations(root) == [4, 2]
    assert verify_files(layout.iteration_dir(root, 4)) == []
    monkeypatch.setattr(sharded, "write_safetensors", real)
    lines = []
    _run(["--train-iters", "6", "--load", root, "--save", root], lines)  # the next save cleans up and succeeds
    assert layout.read_tracker(root) == 6 and not os.path.exists(layout.temporary_dir(root, 6))


def test_what_a_killed_save_left_is_tidied_when_the_next_run_starts(root):
    """A save killed between publish's two renames leaves iter_N.replaced and no iter_N: the next run
    renames it back and resumes from it; a never-finished save and a tracker temporary are deleted."""
    os.rename(layout.iteration_dir(root, 4), layout.iteration_dir(root, 4) + ".replaced")
    os.makedirs(layout.temporary_dir(root, 6))
    open(os.path.join(root, f".{layout.TRACKER}.k1ll3d00.tmp"), "w").write("6")
    lines = []
    assert len(_run(["--train-iters", "5", "--load", root, "--save", root], lines)) == 1
    text = "\n".join(lines)
    assert f"checkpoint: restored {layout.iteration_dir(root, 4)} from {layout.iteration_dir(root, 4)}.replaced" in text
    assert f"resumed from {layout.iteration_dir(root, 4)}: iteration 4" in text
    assert sorted(os.listdir(root)) == ["iter_0000002", "iter_0000004", "iter_0000005", layout.TRACKER]


def test_ckpt_step_missing_tracker_and_keep_last(root):
    lines = []
    assert len(_run(["--train-iters", "5", "--load", root, "--ckpt-step", "2"], lines)) == 3
    with pytest.raises(CheckpointError, match="--ckpt-step 3: .*iter_0000003 does not exist"):
        _run(["--train-iters", "5", "--load", root, "--ckpt-step", "3"])
    os.remove(os.path.join(root, layout.TRACKER))
    lines = []
    assert len(_run(["--train-iters", "5", "--load", root], lines)) == 1
    assert any("has checkpoints but no latest_checkpointed_iteration.txt" in line for line in lines)
    _run(["--train-iters", "10", "--load", root, "--save", root, "--save-interval", "2", "--keep-last", "2"])
    assert layout.list_iterations(root) == [10, 8] and layout.read_tracker(root) == 10


def test_a_different_model_is_refused_and_other_differences_are_noted(root):
    with pytest.raises(CheckpointError, match="saved from a different model: d_ff = 352 in the checkpoint but 256 "
                                              "in this run"):
        _run(["--train-iters", "5", "--load", root, "--ffn-hidden-size", "256"])
    lines = []
    _run(["--train-iters", "5", "--load", root, "--sliding-window", "64"], lines)
    assert "note: sliding_window differs from the checkpoint: 128 there, 64 here" in lines


def test_another_tokenizer_is_refused():
    metadata = {"config": config_to_dict(demo_config()), "tokenizer": {"name": "ByteTokenizer", "checksum": "ab" * 32}}
    with pytest.raises(CheckpointError, match="trained with another tokenizer"):
        check_compatible(metadata, demo_config(), "cd" * 32, "ckpt")
    check_compatible(metadata, demo_config(), "ab" * 32, "ckpt")


def _setup(flags):
    return setup(parse_run_config(BASE + flags, 1), log=lambda *_: None)


def test_finetune_and_no_load_optim(root):
    saved = tensors(layout.iteration_dir(root, 4), "model/")
    for flags, iteration in ((["--finetune"], 0), (["--no-load-optim"], 4), (["--no-load-rng"], 4)):
        trainer = _setup(["--train-iters", "8", "--load", root] + flags)
        assert trainer.iteration == iteration and trainer.consumed_samples == 4 * iteration
        for name, param in trainer.chunks[0].named_parameters():
            assert torch.equal(param.detach(), saved[f"model/{name}"]), name
        assert bool(trainer.optimizer.state) == (flags == ["--no-load-rng"])


@pytest.mark.parametrize("flags,message", [
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--async-save"], "--async-save needs --save"),
    (["--ckpt-step", "5"], "--ckpt-step needs --load"),
    (["--finetune"], "--finetune needs --load"),
    (["--save", "x", "--keep-last", "0"], "--keep-last must be positive"),
    (["--save", "pyproject.toml"], "--save pyproject.toml: exists and is not a directory"),
])
def test_bad_checkpoint_flags_fail_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_run_config(flags, 1)

"""Background saves write exactly what a synchronous save writes, and their failures are not lost."""

from __future__ import annotations

import pytest

import pretrain_longctx
from longctx_megatron.checkpoint import layout, sharded
from longctx_megatron.checkpoint.errors import CheckpointError
from tests.checkpoint.helpers import BASE, assert_same_tensors, tensors


def test_async_checkpoints_equal_synchronous_ones(tmp_path):
    flags = BASE + ["--train-iters", "6", "--save-interval", "2"]
    sync, background = str(tmp_path / "sync"), str(tmp_path / "async")
    lines = []
    expected = pretrain_longctx.run(flags + ["--save", sync], log=lambda *_: None)
    assert pretrain_longctx.run(flags + ["--save", background, "--async-save"], log=lines.append) == expected
    assert layout.list_iterations(background) == [6, 4, 2] and layout.read_tracker(background) == 6
    for iteration in (2, 4, 6):  # training went on while each was written: the snapshot isolates it
        assert_same_tensors(tensors(layout.iteration_dir(sync, iteration)),
                            tensors(layout.iteration_dir(background, iteration)))
    assert any("written in the background" in line for line in lines)


def test_a_failed_background_save_is_raised(tmp_path, monkeypatch):
    def broken(path, *_args):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(sharded, "write_safetensors", broken)
    with pytest.raises(CheckpointError, match="the background checkpoint save failed: .*disk quota exceeded"):
        pretrain_longctx.run(BASE + ["--train-iters", "4", "--save-interval", "2", "--save", str(tmp_path),
                                     "--async-save"], log=lambda *_: None)
    assert layout.read_tracker(str(tmp_path)) is None

"""Checkpoint directory layout: tracker, iteration directories, publishing and pruning."""

from __future__ import annotations

import json
import os

import pytest

from longctx_megatron.checkpoint import layout
from longctx_megatron.checkpoint.manifest import FORMAT


def _staged(root, iteration, content="x"):
    """A staged checkpoint of ours: its metadata.json names our format."""
    staged = layout.temporary_dir(str(root), iteration)
    os.makedirs(staged)
    (open(os.path.join(staged, "f"), "w")).write(content)
    with open(os.path.join(staged, layout.METADATA), "w") as file:
        json.dump({"format": FORMAT}, file)


def test_publish_moves_the_tracker_after_the_rename(tmp_path):
    assert layout.read_tracker(str(tmp_path)) is None and layout.list_iterations(str(tmp_path)) == []
    _staged(tmp_path, 100)
    assert layout.list_iterations(str(tmp_path)) == []  # an unfinished save is not a checkpoint
    assert layout.publish(str(tmp_path), 100) == str(tmp_path / "iter_0000100")
    assert layout.read_tracker(str(tmp_path)) == 100
    assert (tmp_path / layout.TRACKER).read_text() == "100\n"
    _staged(tmp_path, 100, "again")  # saving the same iteration again replaces it
    layout.publish(str(tmp_path), 100)
    assert (tmp_path / "iter_0000100" / "f").read_text() == "again"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000100", layout.TRACKER]


def test_prune_keeps_the_newest_and_the_tracked(tmp_path):
    for iteration in (10, 20, 30, 40):
        _staged(tmp_path, iteration)
        layout.publish(str(tmp_path), iteration)
    assert layout.list_iterations(str(tmp_path)) == [40, 30, 20, 10]
    assert layout.prune(str(tmp_path), 2, protect=10) == [20]
    assert layout.list_iterations(str(tmp_path)) == [40, 30, 10]


def test_prune_leaves_checkpoints_it_did_not_write(tmp_path):
    """A Megatron-LM iter_NNNNNNN (no metadata.json of ours) beside our checkpoints is never deleted."""
    megatron = tmp_path / "iter_0000005" / "mp_rank_00"
    megatron.mkdir(parents=True)
    (megatron / "model_optim_rng.pt").write_bytes(b"not ours")
    (tmp_path / "iter_0000006").mkdir()
    (tmp_path / "iter_0000006" / layout.METADATA).write_text('{"format": "someone else"}')
    for iteration in (10, 20, 30):
        _staged(tmp_path, iteration)
        layout.publish(str(tmp_path), iteration)
    assert layout.prune(str(tmp_path), 1, protect=30) == [20, 10]
    assert layout.list_iterations(str(tmp_path)) == [30, 6, 5]
    assert (megatron / "model_optim_rng.pt").read_bytes() == b"not ours"


def test_bad_tracker_is_reported(tmp_path):
    (tmp_path / layout.TRACKER).write_text("release\n")
    with pytest.raises(ValueError, match="expected an iteration number"):
        layout.read_tracker(str(tmp_path))


def test_recover_tidies_only_what_a_killed_save_left(tmp_path):
    root = str(tmp_path)
    for iteration in (10, 20):
        _staged(tmp_path, iteration)
        layout.publish(root, iteration)
    # Killed between publish's two renames for 20 (the new save is lost, the old one is iter_20.replaced) ...
    os.rename(layout.iteration_dir(root, 20), layout.iteration_dir(root, 20) + ".replaced")
    # ... after both renames for 10 (the superseded copy was not deleted yet), mid-save of 30, and mid-tracker write.
    _staged(tmp_path, 10, "older")
    os.rename(layout.temporary_dir(root, 10), layout.iteration_dir(root, 10) + ".replaced")
    _staged(tmp_path, 30)
    (tmp_path / f".{layout.TRACKER}.a1B2c3d4.tmp").write_text("30")
    kept = [tmp_path / "notes.replaced", tmp_path / f".{layout.TRACKER}.toolong123.tmp", tmp_path / "iter_x.replaced"]
    kept[0].write_text("mine")
    kept[1].write_text("mine")
    kept[2].mkdir()
    done = layout.recover(root)
    assert len(done) == 4 and any("restored" in line and "iter_0000020" in line for line in done)
    assert sorted(os.listdir(tmp_path)) == sorted(["iter_0000010", "iter_0000020", layout.TRACKER,
                                                   *(path.name for path in kept)])
    assert (tmp_path / "iter_0000010" / "f").read_text() == "x"  # the published one, not the superseded
    assert (tmp_path / "iter_0000020" / "f").read_text() == "x"
    assert layout.recover(root) == []  # nothing left to do

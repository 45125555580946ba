"""Where checkpoints live, Megatron-LM's way: ``{save}/iter_0000100/`` and ``latest_checkpointed_iteration.txt``.

A checkpoint is written under a hidden temporary name and renamed into place when complete; the
tracker file names the newest complete checkpoint and is replaced atomically after the rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from longctx_megatron.atomic_file import atomic_write, remove_leftovers
from longctx_megatron.checkpoint.manifest import FORMAT
from longctx_megatron.checkpoint.paths import regular_file_problem

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"
MANIFEST = "manifest.json"
MANIFEST_CRC = "manifest.crc32"  # the manifest's own CRC-32 (hex): it lists every other file's
_ITERATION_DIR = re.compile(r"^iter_(\d{7,})$")
_REPLACED_DIR = re.compile(r"^(iter_\d{7,})\.replaced$")
_TEMPORARY_DIR = re.compile(r"^\.iter_\d{7,}\.incomplete$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def temporary_dir(root: str, iteration: int) -> str:
    """Where a checkpoint is written before it is complete (never taken for a checkpoint by a reader)."""
    return os.path.join(root, f".iter_{iteration:07d}.incomplete")


def shard_file(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def read_tracker(root: str) -> int | None:
    """The iteration the tracker names, or None when there is no tracker (a fresh directory)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    with atomic_write(os.path.join(root, TRACKER), "w") as file:
        file.write(f"{iteration}\n")


def list_iterations(root: str) -> list[int]:
    """Iterations of the renamed (complete-looking) checkpoint directories under ``root``, newest first."""
    if not os.path.isdir(root):
        return []
    found = (_ITERATION_DIR.match(name) for name in os.listdir(root))
    return sorted((int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(root, m.group(0)))),
                  reverse=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(root: str, iteration: int) -> str:
    """Rename the finished temporary directory to its final name (replacing an older save of the same
    iteration), then move the tracker. Returns the final path."""
    final, staged = iteration_dir(root, iteration), temporary_dir(root, iteration)
    fsync_dir(staged)
    if os.path.exists(final):
        retired = final + ".replaced"
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(final, retired)
        os.rename(staged, final)
        shutil.rmtree(retired)
    else:
        os.rename(staged, final)
    fsync_dir(root)
    write_tracker(root, iteration)
    return final


def recover(root: str) -> list[str]:
    """Tidy what a save killed part-way left in ``root`` (call before this run's first save, on one
    rank, with nobody else saving there); returns what was done, one line each. Only our own names
    are touched: ``.iter_N.incomplete`` (a save never published) and the tracker's temporary files
    are deleted; ``iter_N.replaced`` (the older save of an iteration being saved again) is deleted if
    the new ``iter_N`` was published, and otherwise renamed back to ``iter_N``, since it is then the
    only copy of that checkpoint."""
    if not os.path.isdir(root):
        return []
    done = [f"deleted {path} (left by a killed run)" for path in remove_leftovers(os.path.join(root, TRACKER))]
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        if _TEMPORARY_DIR.match(name):
            shutil.rmtree(path)
            done.append(f"deleted {path} (a save that never completed)")
        elif replaced := _REPLACED_DIR.match(name):
            final = os.path.join(root, replaced.group(1))
            if os.path.lexists(final):
                shutil.rmtree(path)
                done.append(f"deleted {path} (superseded by {final})")
            else:
                os.rename(path, final)
                done.append(f"restored {final} from {path} (a save of that iteration was killed; it is verified "
                            "like any checkpoint before it is loaded)")
    return done


def written_here(directory: str) -> bool:
    """Whether ``directory`` is a checkpoint this project wrote (its metadata.json says our format): the
    only kind ``prune`` may delete; a Megatron-LM ``iter_NNNNNNN`` beside ours is left alone."""
    path = os.path.join(directory, METADATA)
    if regular_file_problem(path):
        return False
    try:
        with open(path) as file:
            return json.load(file).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def prune(root: str, keep_last: int, protect: int) -> list[int]:
    """Delete all but the newest ``keep_last`` of our checkpoints (never ``protect``, the tracker's, nor
    a directory we did not write); returns the deleted iterations."""
    ours = [it for it in list_iterations(root) if written_here(iteration_dir(root, it))]
    doomed = [it for it in ours[keep_last:] if it != protect]
    for iteration in doomed:
        shutil.rmtree(iteration_dir(root, iteration))
    return doomed

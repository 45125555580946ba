"""Opening files named by someone else's manifest or index: only plain files inside the directory.

A name comes from a JSON file we did not write, so it must be a plain file name (no directories,
checked by json_checks.plain_name), and what it names must be a regular file: never a symlink
(which may leave the directory), a FIFO (reading it would hang) or a device.
"""

from __future__ import annotations

import os
import stat

from longctx_megatron.checkpoint.errors import CheckpointError


def regular_file_problem(path: str) -> str | None:
    """Why ``path`` may not be read (missing, or not a regular file), or None when it may."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return f"{path} is missing"
    if not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        return f"{path} is {kind}; only regular files inside the directory are read"
    return None


def regular_file(path: str) -> str:
    """``path``, when it names a regular file (not a symlink, FIFO or device); else CheckpointError."""
    problem = regular_file_problem(path)
    if problem:
        raise CheckpointError(problem)
    return path

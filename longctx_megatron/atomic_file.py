"""Nothing half-written: files appear under their name only once completely written."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path


def _default_mode(path: Path) -> int:
    """The existing file's permissions, or what a plain open() would create (0666 minus the umask)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write through a temporary file in the same directory, fsynced and renamed over ``path`` on
    success; on any exception the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode(path))  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_leftovers(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files an ``atomic_write`` of ``path`` left when its process was killed
    (``.{name}.XXXXXXXX.tmp`` beside it: mkstemp's names, regular files only); returns their paths.
    Call it only where no other process may be writing ``path`` at the same time."""
    path = Path(path)
    ours = re.compile(rf"^\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp$")
    removed = []
    for entry in os.scandir(path.parent) if path.parent.is_dir() else ():
        if ours.match(entry.name) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.path)
    return removed

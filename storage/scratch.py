"""Private scratch directories that the next process can tell are abandoned.

A serving runtime keeps a few things in a scratch directory of its own: the links to
the verified files it maps, and the sign streams it has drawn (one bit per parameter per
task, so up to gigabytes). It removes them when it closes. A process that is killed
cannot, and before this module its directories stayed in ``$TMPDIR`` until someone
cleaned up by hand.

Each directory made here holds a lock file that its process keeps locked (``flock``)
for as long as the process lives. The kernel releases the lock when the process ends,
however it ends. A new directory of the same kind first removes those whose lock it can
take. The lock is on the file, not on a process id, so a process id that was reused,
or one in another PID namespace sharing the same ``/tmp``, never makes a live
directory look abandoned. Directories without a lock file (made by older releases) are
left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

LOCK = ".lock"
GRACE_S = 60.0
"""A lock file younger than this is never taken as abandoned: its process may have made
it and not locked it yet."""


class ScratchDir:
    """A new private directory ``.randes-<kind>-*`` under ``parent`` (default: the
    temporary directory), locked while this object lives; `remove` deletes it."""

    def __init__(self, kind: str, parent: Path | None = None) -> None:
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        self.swept = sweep(kind, base)
        self.path = Path(tempfile.mkdtemp(prefix=f".randes-{kind}-", dir=base))
        self._lock: int | None = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)


def sweep(kind: str, base: Path) -> int:
    """Remove the ``.randes-<kind>-*`` directories under ``base`` whose process is gone
    (their lock file can be locked); returns how many it removed."""
    removed = 0
    for entry in base.glob(f".randes-{kind}-*"):
        with contextlib.suppress(OSError):
            if _abandoned(entry):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def _abandoned(entry: Path) -> bool:
    if not entry.is_dir() or entry.is_symlink() or entry.stat().st_uid != os.getuid():
        return False
    try:
        fd = os.open(entry / LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:  # no lock file: not one of ours, or an older release's
        return False
    try:
        if time.time() - os.fstat(fd).st_mtime < GRACE_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its process still holds it
        return False
    finally:
        os.close(fd)  # closing drops the lock this probe took
    return True

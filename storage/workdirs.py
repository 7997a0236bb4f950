"""Private work directories of writers (folds, removals) and of serving runtimes, and
the sweep of dead ones.

A fold computes a whole superposition on local disk before anything is uploaded. A
fold killed outright (SIGKILL, OOM killer, power loss) cannot remove its directory, so
each ``work/<name>`` comes with ``work/<name>.lock``, flock-ed by its process from
before the file is visible until the directory is gone: the kernel drops the lock when
the process dies, and the next writer or gc sweeps every directory whose lock it can
take (`sweep_work_dirs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: stale work dirs are not swept
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PENDING_AGE_S = 24 * 3600.0
"""A lock file never renamed into place (its writer died between creating and renaming
it) is swept once this old: nobody can prove it alive."""

_PENDING = ".pending-"


@contextlib.contextmanager
def work_dir(root: Path) -> Iterator[Path]:
    """A private directory ``root/<name>`` for one writer, removed when it ends."""
    root.mkdir(parents=True, exist_ok=True)
    sweep_work_dirs(root)
    name = uuid.uuid4().hex
    fd, pending = tempfile.mkstemp(dir=root, prefix=_PENDING)
    lock = root / f"{name}.lock"
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(pending, lock)  # visible only once locked
        path = root / name
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        Path(pending).unlink(missing_ok=True)
        lock.unlink(missing_ok=True)
        os.close(fd)  # releases the lock, after the directory is gone


def scratch_root() -> Path:
    """This user's root for the work directories of serving runtimes (their file links
    and kept sign streams), under the temporary directory: made private (0700) and
    refused when it is not a directory of this user's alone. A runtime that was killed
    leaves its directory there, and the next one sweeps it (`work_dir`)."""
    root = Path(tempfile.gettempdir()) / f".randes-scratch-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{root}: not a private directory of this user")
    return root


def sweep_work_dirs(root: Path) -> None:
    """Remove the work directories of writers that died without cleaning up."""
    if fcntl is None or not root.is_dir():
        return
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        try:
            if entry.suffix == ".lock":
                _sweep_locked(entry)
            elif entry.name.startswith(_PENDING) and now - entry.stat().st_mtime > PENDING_AGE_S:
                entry.unlink(missing_ok=True)
        except OSError as exc:  # another sweeper got there first, permissions...
            log.debug("cannot sweep %s: %s", entry, exc)


def _sweep_locked(lock: Path) -> None:
    assert fcntl is not None
    try:
        fd = os.open(lock, os.O_RDWR)  # never O_CREAT: a vanished lock is done with
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer is alive
        log.info("removing the work directory of a fold that died: %s", lock.stem)
        shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)

"""Local writes that are all-or-nothing and fail in one line when the disk is full.

Shared by everything that writes a result directory (materialize, pull, group pull):
the result is built in a hidden sibling and renamed into place, so a destination is
either absent, empty, or complete.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

from randes.errors import RandesError
from storage.store.base import disk_full_error

_P = ParamSpec("_P")
_R = TypeVar("_R")


def reports_full_disk(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A local write that runs out of space (cache, work directory, destination) ends
    the command with one `DiskFullError` line instead of a traceback. Whatever the
    operation had half-written is removed by its own cleanup on the way out."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            workspace = args[0] if args else None
            cache = getattr(getattr(workspace, "settings", None), "resolved_cache_dir", None)
            where = f"work files under {cache}, or the destination" if cache else "local files"
            translated = disk_full_error(exc, f"a local file ({where})") or local_file_error(exc)
            if translated is None:
                raise
            raise translated from exc

    return wrapper


class LocalFileError(RandesError):
    """A local path the command must write or read is not usable: a regular file where a
    directory must be, no permission, a read-only file system..."""


_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ELOOP,
        errno.ENAMETOOLONG,
    }
)


def local_file_error(exc: OSError) -> LocalFileError | None:
    """One line for what the file system says about a path of the environment (RANDES_HOME,
    the cache, a destination), or None for other errors (bugs keep their traceback)."""
    if exc.errno not in _ENVIRONMENT_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "a local path"
    return LocalFileError(f"cannot use {where}: {exc.strerror or exc}")


def check_destination(dest: Path) -> None:
    if dest.is_symlink():  # written through, the link would put the result elsewhere
        raise RandesError(f"destination {dest} is a symbolic link; give the real path")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RandesError(f"destination {dest} exists and is not an empty directory")


@contextlib.contextmanager
def staged_directory(dest: Path) -> Iterator[Path]:
    """A sibling temporary directory renamed onto ``dest`` on success, removed on failure,
    so ``dest`` either does not exist (or stays empty) or holds the whole result."""
    check_destination(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        translated = local_file_error(exc)
        if translated is None:
            raise
        raise RandesError(f"destination {dest}: {translated}") from None
    try:
        yield staging
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

"""Local writes that are all-or-nothing and fail in one line when the disk is full.

Shared by everything that writes a result directory (materialize, pull, group pull):
the result is built in a hidden sibling and renamed into place, so a destination is
either absent, empty, or complete.
"""

from __future__ import annotations

import contextlib
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
            translated = disk_full_error(exc, f"a local file ({where})")
            if translated is None:
                raise
            raise translated from exc

    return wrapper


def check_destination(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RandesError(f"destination {dest} exists and is not an empty directory")


@contextlib.contextmanager
def staged_directory(dest: Path) -> Iterator[Path]:
    """A sibling temporary directory renamed onto ``dest`` on success, removed on failure,
    so ``dest`` either does not exist (or stays empty) or holds the whole result."""
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield staging
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

"""Writing a local file under its final name atomically: temp sibling, fsync, rename.

A reader (or a second process building the same directory) must never see a file
half-written under its final name, and a crash must leave either the old file or the
new one: the bytes go to a hidden temporary sibling in the same directory, are fsynced,
``os.replace``d onto the final name, and the directory is fsynced so that the rename
itself survives a power cut. The one helper for it in the project (fold's index and
side files, materialize's copies, the digits trainer's files).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_sibling(path: Path) -> Path:
    """A hidden, unique name next to ``path`` (same directory, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    For writers that take a path (``safetensors.torch.save_file``, ``shutil.copyfile``).
    The written file is fsynced before the rename and the directory after it; on an
    error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write small bytes (an index, a copied side file, a config) under ``path`` atomically."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)

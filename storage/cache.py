"""Local content-addressed cache of stored objects.

The core reads tensors through memory-mapped safetensors files, so objects held in a
remote store are first brought to local disk. Files are named by their sha256 and
verified when they arrive (`ObjectStore.get_file` checks while streaming) and again
when a cached copy is first reused by a process, so damaged bytes are never folded or
served:

- a damaged cached copy is only a cache miss: it is removed and fetched again from the
  store (verified), with a warning; the command goes on;
- a damaged object in the store is an `IntegrityError` naming its key and, through
  ``context``, the bundle version (or base) it belongs to.

A cached copy that verified is trusted for what it is: bytes whose sha256 the manifest
records. So commands that read through the cache (fold, materialize, validate) may
succeed while the store's copy of an object they have cached is damaged; `randes pull`
reads every object from the store and is the command that checks the store itself.

A fold's own new shards enter the cache without a download (`ObjectCache.adopt`: a hard
link to the file it wrote and hashed), so the next fold reads its parent straight away;
that copy is verified by every later process like a downloaded one. On a local store
the stored object is the same file (``put_file(move=True)``): damage to it is damage to
both, and is reported as the store object's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from randes.errors import IntegrityError
from randes.hashio import stream_hashing
from randes.manifest import ShardRef
from storage.store import ObjectStore

log = logging.getLogger(__name__)


def add_context(exc: IntegrityError, context: str) -> IntegrityError:
    """``exc`` with `` (context)`` appended, unless it already names a bundle or base."""
    message = str(exc)
    if not context or f"({context})" in message or "(bundle " in message or "(base " in message:
        return exc
    return IntegrityError(f"{message} ({context})")


@contextlib.contextmanager
def integrity_context(context: str) -> Iterator[None]:
    """Re-raise any `IntegrityError` inside with ``context`` (e.g. "bundle b version 3")."""
    try:
        yield
    except IntegrityError as exc:
        raise add_context(exc, context) from None


def version_context(bundle: str, version: int) -> str:
    """How errors name the version an object belongs to (see `integrity_context`)."""
    return f"bundle {bundle} version {version}"


def file_sha256(path: Path) -> str:
    """sha256 of a file: large reads into reused buffers, each chunk hashed while the
    next is read (`randes.hashio.stream_hashing`)."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as handle:
        stream_hashing(handle.readinto, [digest])
    return digest.hexdigest()


class ObjectCache:
    """Fetches store objects into ``root/<sha256>`` and verifies them on every use."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self.store = store
        self._verified: dict[Path, tuple[int, int]] = {}
        root.mkdir(parents=True, exist_ok=True)

    def fetch(self, ref: ShardRef, *, context: str = "", suffix: str = ".safetensors") -> Path:
        """Local path of a verified copy of ``ref``; downloads it when missing.

        ``context`` (e.g. "bundle demo v3") goes into the integrity error so a user
        learns which version a damaged shard belongs to. ``suffix`` lets readers that
        go by file type (safetensors) open the cached copy.
        """
        path = self.root / f"{ref.sha256}{suffix}"
        if path.exists():
            if self._verify(path, ref):
                return path
            where = f" ({context})" if context else ""
            log.warning(
                "cached copy of %s%s does not match its sha256; fetching it again from the store",
                ref.key,
                where,
            )
            path.unlink(missing_ok=True)
            self._verified.pop(path, None)
        with integrity_context(context):
            self.store.get_file(ref.key, path, sha256=ref.sha256)
        self._remember(path)
        return path

    def evict(self, ref: ShardRef, *, suffix: str = ".safetensors") -> None:
        """Drop the local copy of ``ref`` (an object the store no longer keeps)."""
        path = self.root / f"{ref.sha256}{suffix}"
        path.unlink(missing_ok=True)
        self._verified.pop(path, None)

    def adopt(self, ref: ShardRef, path: Path, *, suffix: str = ".safetensors") -> None:
        """Keep ``path``, a file this process wrote and hashed as ``ref`` (a fold's new
        superposition shard), as the cached copy of ``ref``.

        The next fold reads its parent through the cache: without this it first copied
        the whole superposition it had just stored out of the store again (a read, a
        sha256 and a 1 GB write). A hard link costs nothing; it is skipped where the
        cache lies on another file system or already holds the object. Later processes
        verify this copy on first use like any other. Where the store linked the same
        file in (a local store, ``put_file(move=True)``), the cached copy and the stored
        object are one file: damage to it is reported as the store object's.
        """
        dest = self.root / f"{ref.sha256}{suffix}"
        if dest.exists():
            return
        try:
            os.link(path, dest)
        except OSError:  # exists by now, another file system, no hard links
            return
        self._remember(dest)

    def _verify(self, path: Path, ref: ShardRef) -> bool:
        """Whether the cached copy at ``path`` holds exactly ``ref``'s bytes.

        Hashed once per process and file version (size, mtime): a copy damaged or
        replaced later changes its mtime and is hashed again.
        """
        stat = path.stat()
        if self._verified.get(path) == (stat.st_size, stat.st_mtime_ns):
            return True
        if stat.st_size != ref.size or file_sha256(path) != ref.sha256:
            return False
        self._remember(path)
        return True

    def _remember(self, path: Path) -> None:
        stat = os.stat(path)
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)

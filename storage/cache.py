"""Local content-addressed cache of stored objects.

The core reads tensors through memory-mapped safetensors files, so objects held in a
remote store are first brought to local disk. Files are named by their sha256 and
verified when they arrive (`ObjectStore.get_file` checks while streaming) and before a
cached copy is reused, so damaged bytes are never folded or served:

- a damaged cached copy is only a cache miss: it is removed and fetched again from the
  store (verified), with a warning; the command goes on;
- a damaged object in the store is an `IntegrityError` naming its key and, through
  ``context``, the bundle version (or base) it belongs to.

What was verified is recorded, the way huggingface_hub and git trust a file they have
seen: once a copy's bytes matched its sha256, its stamp (device, inode, size, mtime and
ctime in nanoseconds) goes into a record beside the cache (``<root>-verified/``), and a
later process reuses the copy without hashing it again while its stamp is the recorded
one. Any write, truncation, replacement, ``touch`` or ``chmod`` changes the stamp (ctime
cannot be set back by a user), and the copy is hashed again before it is used. What a
stamp cannot see is damage below the file system (a failing disk flipping bits in
place): ``randes pull`` reads every object from the store and hashes it, and is the
check of record.

A cached copy that verified is trusted for what it is: bytes whose sha256 the manifest
records. So commands that read through the cache (fold, materialize, validate) may
succeed while the store's copy of an object they have cached is damaged; `randes pull`
reads every object from the store and is the command that checks the store itself.

A fold's own new shards enter the cache without a download (`ObjectCache.adopt`: a hard
link to the file it wrote and hashed), so the next fold reads its parent straight away;
their stamps are recorded (`ObjectCache.settle`) once the work directory that held the
other link is gone. On a local store the stored object is the same file
(``put_file(move=True)``): damage to it is damage to both, and is reported as the store
object's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from randes.checkpoint import Stamp, stamp_of
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
    """Fetches store objects into ``root/<sha256>`` and verifies them before use."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self.store = store
        self.records = root.with_name(f"{root.name}-verified")
        """One small JSON file per verified copy: its sha256 and stamp (see the module)."""
        self._verified: dict[Path, Stamp] = {}
        self._adopted: list[tuple[Path, str]] = []
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
            self._forget(path)
        with integrity_context(context):
            self.store.get_file(ref.key, path, sha256=ref.sha256)
        self._remember(path, ref.sha256, stamp_of(path.stat()))
        return path

    def evict(self, ref: ShardRef, *, suffix: str = ".safetensors") -> None:
        """Drop the local copy of ``ref`` (an object the store no longer keeps)."""
        self._forget(self.root / f"{ref.sha256}{suffix}")

    def adopt(self, ref: ShardRef, path: Path, *, suffix: str = ".safetensors") -> None:
        """Keep ``path``, a file this process wrote and hashed as ``ref`` (a fold's new
        superposition shard), as the cached copy of ``ref``.

        The next fold reads its parent through the cache: without this it first copied
        the whole superposition it had just stored out of the store again (a read, a
        sha256 and a 1 GB write). A hard link costs nothing; it is skipped where the
        cache lies on another file system or already holds the object. Its stamp is
        recorded by `settle`, once the work directory's link is gone (removing a link
        changes the file's ctime). Where the store linked the same file in (a local
        store, ``put_file(move=True)``), the cached copy and the stored object are one
        file: damage to it is reported as the store object's.
        """
        dest = self.root / f"{ref.sha256}{suffix}"
        if dest.exists():
            return
        try:
            os.link(path, dest)
        except OSError:  # exists by now, another file system, no hard links
            return
        self._adopted.append((dest, ref.sha256))

    def settle(self) -> None:
        """Record the copies adopted since the last call as verified: this process
        wrote them and hashed every byte as it wrote them. Called once the writer's
        work directory (their other link) is gone, so the stamps are final."""
        adopted, self._adopted = self._adopted, []
        for path, sha in adopted:
            with contextlib.suppress(FileNotFoundError):
                self._remember(path, sha, stamp_of(path.stat()))

    def _verify(self, path: Path, ref: ShardRef) -> bool:
        """Whether the cached copy at ``path`` holds exactly ``ref``'s bytes.

        Hashed unless its stamp is the one recorded when it last matched (in this
        process or, through the record, an earlier one): a copy damaged or replaced
        since changes its stamp and is hashed again.
        """
        stamp = stamp_of(path.stat())
        if self._verified.get(path) == stamp:
            return True
        if stamp[2] != ref.size:
            return False
        if self._recorded(path, ref.sha256) == stamp:
            self._verified[path] = stamp
            return True
        if file_sha256(path) != ref.sha256:
            return False
        self._remember(path, ref.sha256, stamp)  # the stamp from before the hash
        return True

    def _record_path(self, path: Path) -> Path:
        return self.records / f"{path.name}.json"

    def _recorded(self, path: Path, sha: str) -> Stamp | None:
        """The stamp recorded for ``path`` holding ``sha``'s bytes (None: none)."""
        try:
            data = json.loads(self._record_path(path).read_bytes())
            if data["sha256"] != sha:
                return None
            dev, ino, size, mtime, ctime = (int(x) for x in data["stamp"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (dev, ino, size, mtime, ctime)

    def _remember(self, path: Path, sha: str, stamp: Stamp) -> None:
        """Note ``path`` as verified, in this process and in its record (best effort:
        a record that cannot be written only means hashing the copy again)."""
        self._verified[path] = stamp
        record = self._record_path(path)
        tmp = record.with_name(f".{record.name}.tmp-{uuid.uuid4().hex}")
        try:
            self.records.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"sha256": sha, "stamp": list(stamp)}))
            os.replace(tmp, record)
        except OSError as exc:
            log.debug("could not record %s as verified: %s", path, exc)
            tmp.unlink(missing_ok=True)

    def _forget(self, path: Path) -> None:
        self._record_path(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        self._verified.pop(path, None)

"""The store interface, shared by the local-directory and the S3 backends.

Both backends honour the same contract, and the same behavioural tests run against
each, so a bundle pipeline validated on the embedded default (a local directory)
behaves the same against SeaweedFS, MinIO, R2 or AWS:

- keys are relative, '/'-separated paths (validated here, identically for both);
- writes of content-addressed objects are create-if-absent and idempotent, and
  never leave a partial object visible under its final key;
- reads that know the expected sha256 verify it while streaming and never leave
  unverified bytes at the destination.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from randes.errors import IntegrityError
from storage.errors import DiskFullError, InvalidKeyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temp files are swept by age alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Prefix of temporary files next to their final path (LocalStore objects, and the
#: destination of every ``get_file``). Keys may not have a component starting with
#: it, so a listing can skip leftovers of a crash without ever hiding a real object.
TMP_PREFIX = ".tmp-"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_KEY_BYTES = 1024  # S3's limit on key length
_MAX_COMPONENT_BYTES = 255  # NAME_MAX of common local filesystems


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a ``stat`` tells about one object."""

    key: str
    size: int
    last_modified: datetime  # timezone-aware, UTC
    etag: str | None = None
    """The store's version tag of the bytes (S3 ETag); None where the store has none."""


def _check_text(key: str, what: str) -> None:
    if not isinstance(key, str):
        raise InvalidKeyError(f"{what} must be a string, got {type(key).__name__}")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"{what} {key!r} is not valid UTF-8 text") from None
    if len(encoded) > _MAX_KEY_BYTES:
        raise InvalidKeyError(f"{what} is longer than {_MAX_KEY_BYTES} bytes: {key[:60]!r}...")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise InvalidKeyError(f"{what} {key!r} contains a control character")
    if "\\" in key:
        raise InvalidKeyError(f"{what} {key!r} contains a backslash; use '/' to separate")
    if key.startswith("/"):
        raise InvalidKeyError(f"{what} {key!r} must be relative (no leading '/')")


def _check_component(part: str, key: str, what: str) -> None:
    if part == "":
        raise InvalidKeyError(f"{what} {key!r} has an empty path component")
    if part in (".", ".."):
        raise InvalidKeyError(f"{what} {key!r} has a '{part}' component")
    if part.startswith(TMP_PREFIX):
        raise InvalidKeyError(f"{what} {key!r}: components starting {TMP_PREFIX!r} are reserved")
    if len(part.encode("utf-8")) > _MAX_COMPONENT_BYTES:
        raise InvalidKeyError(f"{what} {key!r} has a component over {_MAX_COMPONENT_BYTES} bytes")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if it is a valid object key, else raise `InvalidKeyError`.

    Rules are the intersection of what S3 and a POSIX directory can both hold safely:
    no way to climb out of the root ('..', leading '/', backslashes), nothing that
    a filesystem would silently normalise (empty or '.' components), no control
    characters (they corrupt logs and XML listings).
    """
    _check_text(key, "key")
    if key == "":
        raise InvalidKeyError("key must not be empty")
    for part in key.split("/"):
        _check_component(part, key, "key")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix: like a key, but empty, a trailing '/' or a partial
    last component (``objects/ab``) are allowed."""
    _check_text(prefix, "prefix")
    if prefix == "":
        return prefix
    parts = prefix.split("/")
    if parts[-1] == "":
        parts = parts[:-1]
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and part not in ("", ".", ".."):
            continue  # a partial last name matches by text: only navigation is refused
        _check_component(part, prefix, "prefix")
    return prefix


def check_sha256(sha256: str | None) -> str | None:
    """Normalise an expected digest (hex, case-insensitive); None means "unknown"."""
    if sha256 is None:
        return None
    low = sha256.lower() if isinstance(sha256, str) else ""
    if not _SHA256_HEX.fullmatch(low):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return low


def tmp_path_for(dest: Path) -> Path:
    """A unique temporary sibling of ``dest``: same directory (hence same filesystem,
    so the final rename/link is atomic), unique so concurrent writers never share it."""
    return dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{dest.name}"[:255])


#: errno values meaning "this local write cannot fit", reported as `DiskFullError`.
DISK_FULL_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file-size limit)",
}


def disk_full_error(exc: OSError, what: str) -> DiskFullError | None:
    """The one-line error for a write that ran out of space, or None for other errors.

    ``what`` says what was being written (``object 'k' in file:///store``): a failed
    ``write()`` carries no file name, so the caller's context is the useful part.
    """
    reason = DISK_FULL_ERRNOS.get(exc.errno or 0)
    if reason is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    hint = "raise the limit" if exc.errno == errno.EFBIG else "free some space"
    return DiskFullError(f"{reason} writing {what}{where}; {hint} and run it again")


def lock_while_writing(fd: int) -> None:
    """Mark a temporary file as being written: `sweep_tmp_files` never removes a file
    whose writer is alive (the kernel drops the lock when the process dies)."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def sweep_tmp_files(root: Path, older_than: float) -> int:
    """Remove ``.tmp-*`` files under ``root`` left by writers that died mid-write.

    A file goes only when it was last modified more than ``older_than`` seconds ago
    and no live process holds its write lock (`lock_while_writing`). Returns how many
    were removed. Errors on single entries (raced with another sweeper) are skipped.
    """
    removed = 0
    now = time.time()
    for directory, _dirs, names in os.walk(root):
        for name in names:
            if not name.startswith(TMP_PREFIX):
                continue
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                if now - os.fstat(fd).st_mtime < older_than:
                    continue
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue  # its writer is alive
                os.unlink(path)
                removed += 1
                log.info("removed %s, left by a writer that died", path)
            except OSError as exc:
                log.debug("cannot sweep %s: %s", path, exc)
            finally:
                os.close(fd)
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename/link in ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def integrity_error(key: str, url: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"object {key!r} in {url} does not match its sha256: expected {expected}, "
        f"got {actual} (damaged or replaced in the store)"
    )


def verify_bytes(data: bytes, sha256: str | None, key: str, url: str) -> bytes:
    expected = check_sha256(sha256)
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise integrity_error(key, url, expected, actual)
    return data


class ObjectStore(ABC):
    """A flat namespace of immutable-by-convention objects under one root URL.

    ``url`` identifies the root (``file:///abs/dir`` or ``s3://bucket/prefix``); it
    appears in every error message and never holds credentials.
    """

    url: str

    #: fsync each downloaded file before renaming it onto its destination. Off by
    #: default: every consumer re-verifies downloads by sha256 (the cache does after
    #: a restart) or can fetch again, and on a fast link the fsync costs as much as
    #: the transfer. Store *writes* are always durable.
    durable_downloads: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @abstractmethod
    def ensure_root(self) -> None:
        """Create the root (directory or bucket) if missing; used by ``randes init``."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, sha256: str, move: bool = False) -> bool:
        """Store the file at ``path`` under ``key`` unless the key already exists.

        ``sha256`` is checked against the bytes actually sent: a mismatch raises
        `IntegrityError` and stores nothing, so a content-addressed key can never hold
        other content. Returns True if this call wrote the object, False if the key
        existed (content-addressed keys make a second put a no-op).

        ``move=True`` says the file is the caller's own output, handed over: written,
        fsynced and hashed (``sha256``) by this process from the bytes it wrote, in a
        private directory, never modified or reused afterwards (a fold's shards). A
        store on the same file system may then take the file itself (a hard link)
        instead of copying it; a remote store uploads it as usual.
        """

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = True) -> bool:
        """Store ``data``; with ``if_absent`` (default) an existing key is kept and
        False returned, otherwise the object is replaced atomically."""

    @abstractmethod
    def get_file(self, key: str, dest: Path, *, sha256: str | None) -> None:
        """Download ``key`` to ``dest`` (parents created), verifying ``sha256`` while
        streaming. Bytes go to a temporary sibling renamed onto ``dest`` only when
        complete and verified: on a mismatch (`IntegrityError`) or any error, ``dest``
        is untouched. ``sha256=None`` skips verification (sources of unknown digest).
        """

    @abstractmethod
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """Whole object in memory (manifests, small files), verified if ``sha256`` given."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time; `ObjectNotFoundError` if absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (gc may race)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in lexicographic key order."""

    def sweep_incomplete(self, older_than: float, *, keep: Collection[str] = ()) -> int:
        """Remove what writers that died mid-write left behind, started more than
        ``older_than`` seconds ago: temporary files of a local store, incomplete
        multipart uploads on S3. An upload for a key in ``keep`` (keys a live writer
        leased) is left alone. Returns how many were removed; never touches objects.

        Listings never show these leftovers; they only cost space. `Workspace.gc`
        calls this.
        """
        return 0

"""The store as a local directory: the embedded default, and offline pulled bundles.

Crash safety is the whole point of the write path: an object is written to a unique
temporary sibling, fsynced, then *linked* (not renamed) onto its final name. A link
fails if the name exists, which gives create-if-absent atomically (two writers of
the same content-addressed key cannot clobber each other) and a crash at any moment
leaves either no object or a complete one, plus at worst a ``.tmp-*`` leftover that
listings ignore and `sweep_incomplete` (run by ``randes gc``) removes. A full disk is
reported as `DiskFullError`, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from randes.hashio import stream_hashing
from storage.errors import InvalidKeyError, ObjectNotFoundError, StoreError
from storage.store.base import (
    TMP_PREFIX,
    ObjectInfo,
    ObjectStore,
    check_sha256,
    disk_full_error,
    fsync_dir,
    integrity_error,
    lock_while_writing,
    sweep_tmp_files,
    tmp_path_for,
    validate_key,
    validate_prefix,
    verify_bytes,
)

# Errors of os.link meaning "this filesystem has no hard links", not "target exists".
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def copy_hashing(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream, returning (sha256 hex, size): one pass for copy and digest."""
    digest = hashlib.sha256()
    # reused buffers, each chunk hashed on a helper thread while it is written
    size = stream_hashing(src.readinto, [digest], sink=dst.write)  # type: ignore[attr-defined]
    return digest.hexdigest(), size


def makedirs_durable(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every directory it creates, so a linked
    object is reachable after a power loss, not only its directory entry's inode."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """Turn a write that ran out of space into `DiskFullError` (one line, no traceback)."""
    try:
        yield
    except OSError as exc:
        translated = disk_full_error(exc, what)
        if translated is None:
            raise
        raise translated from exc


def publish_no_replace(tmp: Path, final: Path) -> bool:
    """Give the complete file ``tmp`` the name ``final`` unless it exists.

    Returns True if published. ``tmp`` is always gone afterwards.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        # No hard links here (some network/FUSE filesystems): check-then-rename is
        # racy between two writers, but both hold the same verified content.
        if final.exists():
            return False
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return True
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(final.parent)
    return True


class LocalStore(ObjectStore):
    """Objects as files under ``root``; keys map one-to-one onto relative paths."""

    def __init__(self, root: Path | str, *, durable_downloads: bool = False) -> None:
        root = Path(root)
        self.durable_downloads = durable_downloads
        if not root.is_absolute():
            root = root.resolve()
        self.root = root
        self.url = root.as_uri()

    # ----------------------------------------------------------------- helpers
    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _missing(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"no object {key!r} in {self.url}")

    def _make_parent(self, final: Path, key: str) -> None:
        """Create the directories of ``key``. S3 can hold both ``a`` and ``a/b``; a
        directory cannot, so that conflict is reported as a key problem."""
        try:
            makedirs_durable(final.parent)
            if not final.parent.is_dir():
                raise NotADirectoryError(final.parent)
        except (FileExistsError, NotADirectoryError):
            raise InvalidKeyError(
                f"key {key!r} in {self.url}: a parent path is an object, not a directory"
            ) from None
        if final.is_dir():
            raise InvalidKeyError(
                f"key {key!r} in {self.url} is a directory of other objects, not an object"
            )

    def _disk_full(self, key: str) -> contextlib.AbstractContextManager[None]:
        return _disk_errors(f"object {key!r} in {self.url}")

    def _write_new(self, key: str, fill: BinaryIO | bytes, expected: str | None) -> bool:
        """Write to a temporary sibling, verify, fsync, then publish without replacing.

        The temporary file is locked from its creation until it is published or removed,
        so `sweep_incomplete` never takes a file from a live writer; a full disk removes
        it and raises `DiskFullError`.
        """
        final = self._path(key)
        if final.is_file():
            return False
        with self._disk_full(key):
            self._make_parent(final, key)
            tmp = tmp_path_for(final)
            try:
                with open(tmp, "xb") as out:
                    lock_while_writing(out.fileno())
                    if isinstance(fill, bytes):
                        out.write(fill)
                        actual = hashlib.sha256(fill).hexdigest() if expected else ""
                    else:
                        actual, _ = copy_hashing(fill, out)
                    if expected is not None and actual != expected:
                        raise integrity_error(key, self.url, expected, actual)
                    out.flush()
                    os.fsync(out.fileno())
                    return publish_no_replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------- API
    def ensure_root(self) -> None:
        try:
            makedirs_durable(self.root)
        except OSError as exc:
            raise StoreError(f"cannot create store root {self.url}: {exc.strerror}") from exc
        if not self.root.is_dir():
            raise StoreError(f"store root {self.url} exists and is not a directory")

    def put_file(self, key: str, path: Path, *, sha256: str, move: bool = False) -> bool:
        expected = check_sha256(sha256)
        validate_key(key)
        if move:
            linked = self._link_new(key, Path(path))
            if linked is not None:
                return linked
        with open(path, "rb") as src:
            return self._write_new(key, src, expected)

    def _link_new(self, key: str, path: Path) -> bool | None:
        """Publish a file handed over with ``move=True`` by hard-linking it: no copy.

        Copying a fold's 1 GB superposition into the store used to cost a read, a
        second sha256, a write and an fsync of every byte. The caller wrote, fsynced and
        hashed the file itself, so linking it in is as durable and as verified. The
        protocol is the copy's: a locked temporary sibling (here a second name of the
        same file), published by `publish_no_replace`, so a crash leaves at worst a
        ``.tmp-*`` name that `sweep_incomplete` removes. None when this file system
        cannot link it (another device, no hard links): the caller copies instead.
        """
        final = self._path(key)
        if final.is_file():
            return False
        with self._disk_full(key):
            self._make_parent(final, key)
            tmp = tmp_path_for(final)
            try:
                os.link(path, tmp)
            except OSError as exc:
                if exc.errno in _NO_LINK_ERRNOS:
                    return None
                raise
            try:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    lock_while_writing(fd)
                    return publish_no_replace(tmp, final)
                finally:
                    os.close(fd)
            finally:
                tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = True) -> bool:
        if if_absent:
            return self._write_new(key, bytes(data), None)
        final = self._path(key)
        with self._disk_full(key):
            self._make_parent(final, key)
            tmp = tmp_path_for(final)
            try:
                with open(tmp, "xb") as out:
                    lock_while_writing(out.fileno())
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                    os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        fsync_dir(final.parent)
        return True

    def get_file(self, key: str, dest: Path, *, sha256: str | None) -> None:
        expected = check_sha256(sha256)
        src_path = self._path(key)
        dest = Path(dest)
        with _disk_errors(f"{dest} (a copy of {key!r} from {self.url})"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path_for(dest)
            try:
                try:
                    src = open(src_path, "rb")  # noqa: SIM115 - closed by the with below
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise self._missing(key) from None
                with src, open(tmp, "xb") as out:
                    lock_while_writing(out.fileno())
                    actual, _ = copy_hashing(src, out)
                    if expected is not None and actual != expected:
                        raise integrity_error(key, self.url, expected, actual)
                    out.flush()  # every byte in the file before it becomes ``dest``
                    if self.durable_downloads:
                        os.fsync(out.fileno())
                    os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key) from None
        return verify_bytes(data, sha256, key, self.url)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        if not path.is_file():
            raise self._missing(key)
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        # Empty directories are left in place: removing them could race with a
        # writer that has just created one to put its temporary file in.
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            pass  # a "directory" key is no object

    def sweep_incomplete(self, older_than: float, *, keep: Collection[str] = ()) -> int:
        """Remove ``.tmp-*`` files of writers that died (locked files are never taken)."""
        return sweep_tmp_files(self.root, older_than)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        directory, _, _ = prefix.rpartition("/")
        base = self.root.joinpath(*directory.split("/")) if directory else self.root
        rel = f"{directory}/" if directory else ""
        yield from self._walk(base, rel, prefix)

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        """Depth-first walk in S3's order: sorting directory names with a trailing
        '/' makes the walk order equal to the sorted order of the full key strings."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        named = sorted(
            ((e.name + "/" if e.is_dir(follow_symlinks=False) else e.name), e) for e in entries
        )
        for name, entry in named:
            if entry.name.startswith(TMP_PREFIX):
                continue
            key = rel + name
            if name.endswith("/"):
                # Descend only where some key below could still match the prefix.
                if key.startswith(prefix) or prefix.startswith(key):
                    yield from self._walk(Path(entry.path), key, prefix)
                continue
            if not key.startswith(prefix) or not entry.is_file():
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

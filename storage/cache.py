"""Local content-addressed cache of stored objects.

The core reads tensors through memory-mapped safetensors files, so objects held in a
remote store are first brought to local disk. Files are named by their sha256 and
verified when they arrive (`ObjectStore.get_file` checks while streaming) and again
when a cached copy is reused, so a damaged cache or store is reported, never folded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from randes.errors import IntegrityError
from randes.manifest import ShardRef
from storage.store import ObjectStore

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
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
            self._verify(path, ref, context)
            return path
        try:
            self.store.get_file(ref.key, path, sha256=ref.sha256)
        except IntegrityError as exc:
            where = f" ({context})" if context else ""
            raise IntegrityError(f"{exc}{where}") from None
        self._remember(path)
        return path

    def _verify(self, path: Path, ref: ShardRef, context: str) -> None:
        stat = path.stat()
        if self._verified.get(path) == (stat.st_size, stat.st_mtime_ns):
            return
        if stat.st_size != ref.size or file_sha256(path) != ref.sha256:
            path.unlink(missing_ok=True)
            where = f" ({context})" if context else ""
            raise IntegrityError(
                f"cached copy of {ref.key} does not match its sha256{where}; removed it, "
                "run the command again to fetch a fresh copy"
            )
        self._remember(path)

    def _remember(self, path: Path) -> None:
        stat = os.stat(path)
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)

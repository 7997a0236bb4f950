"""One store, one registry and a local cache, wired together: what storage works on.

`storage.workspace.Workspace` is this plus the commands; the modules that carry out a
command (`storage.folding`, `storage.gc`, `storage.pull`) take a `Wiring`, so none of
them needs the class that calls them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from randes.checkpoint import CheckpointReader
from randes.manifest import BaseManifest, BundleManifest, load_base_manifest
from storage.cache import ObjectCache, integrity_context
from storage.commit import read_manifest
from storage.localfs import LocalFileError, local_file_error
from storage.readers import CacheFiles, check_base, open_base
from storage.registry import Registry, VersionRecord
from storage.settings import Settings
from storage.sources import open_configured_store
from storage.store import ObjectStore


class Wiring:
    """The store, registry and cache the environment (or the caller) names."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: ObjectStore | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or open_configured_store(settings.resolved_store_url, settings)
        self.registry = registry or Registry(settings.resolved_database_url)
        try:
            self.cache = ObjectCache(settings.resolved_cache_dir / "objects", self.store)
        except OSError as exc:  # the cache dir (or RANDES_HOME) is a file, not writable...
            translated = local_file_error(exc)
            if translated is None:
                raise
            raise LocalFileError(f"cache directory (RANDES_CACHE_DIR): {translated}") from None
        self.files = CacheFiles(self.cache)
        """Verified local copies of stored objects (`storage.readers`)."""
        self.work_root: Path = settings.resolved_cache_dir / "work"

    def base_manifest(self, name: str) -> BaseManifest:
        record = self.registry.get_base(name)
        with integrity_context(f"base {name}"):
            data = self.store.get_bytes(record.manifest_key, sha256=record.manifest_sha256)
        return load_base_manifest(data)

    def open_base(self, name: str) -> contextlib.AbstractContextManager[CheckpointReader]:
        """A verified local reader of the registered base ``name``."""
        return open_base(self.files, self.base_manifest(name))

    def base_of(self, manifest: BundleManifest) -> BaseManifest:
        """The registered base ``manifest`` was built on (IntegrityError if it changed)."""
        return check_base(self.base_manifest(manifest.base.name), manifest)

    def manifest(self, version: VersionRecord) -> BundleManifest:
        return read_manifest(self.store, version)

    def resolve(self, bundle: str, ref: str | None = None) -> tuple[VersionRecord, BundleManifest]:
        record = self.registry.resolve(bundle, ref)
        return record, self.manifest(record)

"""Where a serving runtime gets its verified files: a pulled directory or the workspace.

Both give the same four things, each file checked against the sha256 its manifest
records before it is read: the version's manifests, the base's shards (for a registry
reference checked, as `Workspace.open_task` does, to be the base the bundle was built
on), the served superposition's shards, and one
task's private shards and side files, fetched only when that task is first asked for.
Safetensors readers open files by suffix and objects are named by sha256 alone, so the
objects of a pulled directory are read through ``<sha256>.safetensors`` links in a
scratch directory, as `storage.pulled` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from randes.checkpoint import CheckpointReader
from randes.errors import IntegrityError, RandesError
from randes.manifest import BundleManifest, ShardRef, TaskEntry
from randes.names import validate_name
from storage.cache import version_context
from storage.pulled import PulledVersion, PulledVersionError
from storage.settings import Settings, load_settings
from storage.workdirs import scratch_root, work_dir

if TYPE_CHECKING:
    from storage.workspace import Workspace


class BundleRuntimeError(RandesError):
    """A module or a request a runtime cannot serve (shapes differ, no config.json...)."""


class RuntimeSourceError(RandesError):
    """A runtime asked for something its source cannot give (no tasks, no master)."""


def split_ref(spec: str) -> tuple[str, str | None]:
    """``BUNDLE[@VERSION|@ALIAS]`` -> (bundle, ref or None for the head), names checked."""
    bundle, sep, ref = spec.partition("@")
    validate_name(bundle, "bundle name")
    if sep and not ref:
        raise RuntimeSourceError(f"{spec!r}: empty version or alias after '@'")
    return bundle, ref or None


class RuntimeSource:
    """Verified files of one bundle version (base class: the two sources below)."""

    manifest: BundleManifest
    base_norms: dict[str, float]

    def base_files(self) -> list[Path]:
        """Verified local ``.safetensors`` paths of the base this version was built on."""
        raise NotImplementedError

    def files(self, refs: Sequence[ShardRef]) -> list[Path]:
        """Verified local ``.safetensors`` paths of ``refs`` (shards of this version)."""
        raise NotImplementedError

    def side_file(self, ref: ShardRef) -> Path:
        """Verified local path of one side file (config.json...)."""
        raise NotImplementedError

    def served_refs(self, *, master: bool) -> tuple[list[ShardRef], bool]:
        """(shards of the superposition to serve, whether they are the quantized copy)."""
        manifest = self.manifest
        if not manifest.tasks:
            raise RuntimeSourceError(
                f"bundle {manifest.bundle} version {manifest.version} holds no tasks to serve"
            )
        if master or manifest.serving is None:
            return list(manifest.superposition), False
        return list(manifest.serving.shards), True

    def private(self, entry: TaskEntry) -> CheckpointReader | None:
        if not entry.private:
            return None
        return CheckpointReader.from_files(self.files(entry.private))

    def close(self) -> None:
        """Release what the source holds (scratch links, the registry connection)."""


class PulledSource(RuntimeSource):
    """A directory written by `randes pull` (offline: no registry, no store)."""

    def __init__(self, root: Path) -> None:
        self.pulled = PulledVersion(root)
        self.manifest = self.pulled.manifest
        self.base_norms = dict(self.pulled.base.norms)
        self._scratch = contextlib.ExitStack()
        self._links = self._scratch.enter_context(work_dir(scratch_root()))  # sweeps too

    def files(self, refs: Sequence[ShardRef]) -> list[Path]:
        paths = []
        for ref in refs:
            link = self._links / f"{ref.sha256}.safetensors"
            if not link.exists():
                link.symlink_to(self.pulled.verified(ref).resolve())
            paths.append(link)
        return paths

    def base_files(self) -> list[Path]:
        return self.files(self.pulled.base.shards)

    def side_file(self, ref: ShardRef) -> Path:
        return self.pulled.verified(ref)

    def served_refs(self, *, master: bool) -> tuple[list[ShardRef], bool]:
        refs, quantized = super().served_refs(master=master)
        if not quantized and not self.pulled.has_master:
            raise PulledVersionError(
                f"{self.pulled.root}: the master superposition was not pulled (pull with --master)"
            )
        return refs, quantized

    def close(self) -> None:
        self._scratch.close()


class StoreSource(RuntimeSource):
    """``BUNDLE[@VERSION|@ALIAS]`` resolved in the registry, objects through the verified
    cache of the workspace the environment (or ``settings``) describes."""

    def __init__(self, spec: str, *, settings: Settings | None = None) -> None:
        # imported here: a server of pulled directories needs none of the registry's or
        # the store's libraries (~20 MB of RSS)
        from storage.workspace import Workspace

        bundle, ref = split_ref(spec)
        # not Workspace.open: a serving process keeps its own torch thread settings
        self.workspace: Workspace = Workspace(settings or load_settings())
        try:
            _, self.manifest = self.workspace.resolve(bundle, ref)
            self.base_norms = dict(self.workspace.base_manifest(self.manifest.base.name).norms)
            self._context = version_context(self.manifest.bundle, self.manifest.version)
        except BaseException:
            self.workspace.close()
            raise

    def base_files(self) -> list[Path]:
        # the same identity check as Workspace.open_task: the registry's base must be
        # the one the bundle was built on
        base = self.workspace.base_manifest(self.manifest.base.name)
        if base.sha256 != self.manifest.base.sha256:
            raise IntegrityError(
                f"base {base.name!r} in the registry is not the base bundle "
                f"{self.manifest.bundle!r} was built on"
            )
        return [self.workspace.cache.fetch(r, context=f"base {base.name}") for r in base.shards]

    def files(self, refs: Sequence[ShardRef]) -> list[Path]:
        return [self.workspace.cache.fetch(ref, context=self._context) for ref in refs]

    def side_file(self, ref: ShardRef) -> Path:
        return self.workspace.cache.fetch(ref, context=self._context, suffix="")

    def close(self) -> None:
        self.workspace.close()


def open_source(path_or_ref: str | Path, *, settings: Settings | None = None) -> RuntimeSource:
    """A pulled directory when ``path_or_ref`` is one, else a registry reference."""
    if isinstance(path_or_ref, Path) or Path(path_or_ref).is_dir():
        return PulledSource(Path(path_or_ref))
    text = str(path_or_ref)
    if "/" in text or Path(text).exists():
        raise RuntimeSourceError(f"{text}: not a directory written by `randes pull`")
    return StoreSource(text, settings=settings)

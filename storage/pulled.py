"""A directory written by `randes pull`, read offline: no registry, no store server.

`storage.pull` lays a version out like the store (``objects/``, ``manifests/``) plus a
``bundle.json`` pointer; this module rebuilds a task from it, so a pulled bundle is a
deployable artifact on a machine that reaches neither the database nor the bucket.
Every object is checked against the sha256 its manifest records before it is read,
exactly as reads from the store are. A default pull holds the serving superposition and
not the fp32 master: the task comes back from what was pulled, and asking for the master
of such a directory says so in one line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from randes.errors import IntegrityError, RandesError
from randes.manifest import (
    BaseManifest,
    BundleManifest,
    ShardRef,
    load_base_manifest,
    load_bundle_manifest,
)
from storage.cache import file_sha256, integrity_context, version_context
from storage.localfs import staged_directory
from storage.readers import open_task, write_task
from storage.registry import TaskNotFoundError, VersionRecord
from storage.store.base import validate_key
from storage.store.local import LocalStore

POINTER = "bundle.json"


class PulledVersionError(RandesError):
    """A directory that is not a pulled version, or lacks what was asked of it."""


class PulledVersion:
    """One version pulled to ``root``: its manifests, and verified readers of its objects.

    ``pointer`` names the version's pointer file when ``root`` holds several (a group
    pull writes ``bundles/<bundle>.json``); by default ``root/bundle.json``.
    """

    def __init__(self, root: Path, pointer: Path | None = None) -> None:
        self.root = Path(root)
        pointer_path = Path(pointer) if pointer is not None else self.root / POINTER
        try:
            data = json.loads(pointer_path.read_text(encoding="utf-8"))
            key, sha = str(data["manifest_key"]), str(data["manifest_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PulledVersionError(
                f"{self.root}: not a pulled bundle version (no readable {pointer_path.name}: {exc})"
            ) from None
        store = LocalStore(self.root)
        with integrity_context(f"pulled {self.root}"):
            self.manifest: BundleManifest = load_bundle_manifest(store.get_bytes(key, sha256=sha))
            ref = self.manifest.base
            self.base: BaseManifest = load_base_manifest(
                store.get_bytes(ref.manifest_key, sha256=ref.manifest_sha256)
            )
        self.context = version_context(self.manifest.bundle, self.manifest.version)

    @property
    def has_master(self) -> bool:
        """Whether the fp32 master superposition was pulled (``pull --master``)."""
        return all(self._path(ref).is_file() for ref in self.manifest.superposition)

    def _path(self, ref: ShardRef) -> Path:
        return self.root.joinpath(*validate_key(ref.key).split("/"))

    def verified(self, ref: ShardRef) -> Path:
        """The pulled file of ``ref``, once its size and sha256 are checked."""
        path = self._path(ref)
        if not path.is_file():
            raise PulledVersionError(f"{self.root}: object {ref.key} is missing ({self.context})")
        if path.stat().st_size != ref.size or file_sha256(path) != ref.sha256:
            raise IntegrityError(
                f"pulled object {ref.key} does not match its sha256 ({self.context})"
            )
        return path

    def materialize(
        self,
        task: str,
        dest: Path,
        *,
        master: bool = False,
        scale: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Write ``task`` as a standalone model directory at ``dest`` (new or empty), from
        the served superposition (or the master with ``master``), like `randes materialize`.
        """
        manifest = self.manifest
        try:
            manifest.task(task)
        except KeyError:
            raise TaskNotFoundError(manifest.bundle, task) from None
        if (master or manifest.serving is None) and not self.has_master:
            raise PulledVersionError(
                f"{self.root}: the master superposition was not pulled (pull with --master)"
            )
        links = Path(tempfile.mkdtemp(prefix=".randes-links-"))
        try:
            with (
                open_task(
                    PulledFiles(self, links), manifest, self.base, task, master=master
                ) as opened,
                staged_directory(Path(dest)) as staging,
            ):
                write_task(opened, manifest, self.base, staging, scale=scale, progress=progress)
        finally:
            shutil.rmtree(links, ignore_errors=True)
        return Path(dest)


@dataclass(frozen=True)
class PulledFiles:
    """The objects of a pulled directory, each verified before it is read
    (`storage.readers.ObjectFiles`).

    Safetensors readers open files by suffix; objects are named by sha256 alone, so each
    is read through a ``<sha256>.safetensors`` link in the scratch directory ``links``.
    """

    pulled: PulledVersion
    links: Path

    def tensor_file(self, ref: ShardRef, context: str) -> Path:
        link = self.links / f"{ref.sha256}.safetensors"
        if not link.exists():
            link.symlink_to(self.pulled.verified(ref).resolve())
        return link

    def side_file(self, ref: ShardRef, context: str) -> Path:
        return self.pulled.verified(ref)


def pulled_shards(manifest: BundleManifest, *, master: bool) -> list[ShardRef]:
    """The objects of ``manifest`` that `storage.pull` copies: all of them, except the
    fp32 master superposition of a version that serves a quantized copy (unless
    ``master``)."""
    refs = list(manifest.shards())
    if master or manifest.serving is None:
        return refs
    skip = {ref.key for ref in manifest.superposition}
    skip -= {ref.key for ref in refs if ref not in manifest.superposition}  # shared bytes
    return [ref for ref in refs if ref.key not in skip]


def pointer_json(
    bundle: str, record: VersionRecord, manifest: BundleManifest, *, master: bool
) -> str:
    has_master = master or manifest.serving is None
    return json.dumps(
        {
            "bundle": bundle,
            "version": record.version,
            "manifest_key": record.manifest_key,
            "manifest_sha256": record.manifest_sha256,
            "served": manifest.serving.scheme.name if manifest.serving else "master",
            "master": has_master,
        },
        indent=2,
    )

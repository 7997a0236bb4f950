"""The bundle lifecycle over one store + one registry + a local cache: every command's entry.

`Workspace` wires the three together (`storage.wiring`) and names the commands; each
one is carried out by the module that owns its concept:

- `storage.commit`: the one way a version is made (optimistic retry on the parent,
  leases, uploads, the registry transaction);
- `storage.folding`: fold a checkpoint in, fold a task out (changes for the commit);
- `storage.readers`: the readers a task is rebuilt from (base, served superposition,
  private tensors, side files, the task's source);
- `storage.pull`: versions copied to a local directory; `storage.pulled` reads them;
- `storage.gc`: retention, unreferenced objects, dead writers' leftovers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from randes.adapters import is_adapter
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig, stored_config
from randes.digests import source_digests
from randes.errors import NonFiniteTensorError, RandesError
from randes.manifest import BaseManifest, BundleManifest, TaskEntry
from randes.names import validate_name
from randes.scaling import manifest_task_scale
from storage.cache import file_sha256
from storage.commit import (
    FoldContentionError,
    Upload,
    lease_keys,
    manifest_sha,
    new_owner,
    put_manifest,
    release,
    upload,
)
from storage.folding import (
    MAX_SCALE,
    FoldOutcome,
    Progress,
    check_scale,
    fold_checkpoint,
    remove_task,
)
from storage.gc import GcReport, collect
from storage.keys import blob_key, manifest_key
from storage.localfs import reports_full_disk, staged_directory
from storage.pull import pull_bundle
from storage.readers import OpenTask, open_task, write_task
from storage.registry import BaseRecord, BundleRecord, TaskNotFoundError, VersionRecord
from storage.settings import Settings, load_settings
from storage.sources import resolve_source
from storage.wiring import Wiring

__all__ = [
    "MAX_SCALE",
    "FoldContentionError",
    "FoldOutcome",
    "GcReport",
    "OpenTask",
    "Progress",
    "Workspace",
]


class Workspace(Wiring):
    """One store, one registry and a local cache: what every command works on."""

    @classmethod
    def open(cls, settings: Settings | None = None) -> Workspace:
        """The workspace the environment describes; also applies the process-wide
        torch thread setting, since commands and flow runs enter through here."""
        settings = settings or load_settings()
        torch.set_num_threads(settings.torch_threads)
        return cls(settings)

    def close(self) -> None:
        self.registry.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ setup
    def init(self) -> None:
        """Create the store root and bring the registry schema to the newest migration."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.store.ensure_root()
        self.registry.upgrade()

    # ------------------------------------------------------------------ bases
    @reports_full_disk
    def add_base(self, name: str, source: str) -> BaseRecord:
        """Register and store a base model: its weight files verbatim, content-addressed.

        Same protocol as a commit: the keys are leased before anything is uploaded (a
        concurrent `gc` keeps them, or this waits out its announced deletions), and the
        base is visible only once its registry row commits.
        """
        validate_name(name, "base name")
        resolved = resolve_source(source, settings=self.settings)
        with resolved.open() as reader:
            if is_adapter(reader):
                raise RandesError(
                    f"{source}: a PEFT adapter is not a base model; register the model it "
                    "was trained on, then fold the adapter"
                )
            digest = source_digests(reader).content
            # Every tensor is read (and checked finite) before anything is uploaded: a
            # base holding NaN/Inf would make every later fold fail, and is refused here.
            norms = _base_norms(reader)
            side = sorted(reader.side_files.items())
            shas = {path: file_sha256(path) for path in [*reader.files, *(p for _, p in side)]}
            owner = new_owner()
            try:
                lease_keys(self.registry, sorted({blob_key(sha) for sha in shas.values()}), owner)
                shards = [
                    upload(self.store, Upload.of_file(p, sha=shas[p], tensors=_file_tensors(p)))
                    for p in reader.files
                ]
                files = {n: upload(self.store, Upload.of_file(p, sha=shas[p])) for n, p in side}
                manifest = BaseManifest(
                    name=name,
                    uri=resolved.uri,
                    sha256=digest,
                    shards=shards,
                    files=files,
                    norms=norms,
                )
                lease_keys(self.registry, [manifest_key(manifest_sha(manifest))], owner)
                key, sha = put_manifest(self.store, manifest)
                keys = [ref.key for ref in shards] + [ref.key for ref in files.values()] + [key]
                return self.registry.add_base(
                    name, resolved.uri, digest, key, sha, object_keys=keys
                )
            finally:
                release(self.registry, owner)

    # ---------------------------------------------------------------- bundles
    def create_bundle(
        self, name: str, base: str, config: TransformConfig, *, gate_threshold: float | None = None
    ) -> BundleRecord:
        validate_name(name, "bundle name")
        return self.registry.create_bundle(
            name, base, config.model_dump(mode="json"), gate_threshold=gate_threshold
        )

    def bundle_config(self, bundle: str) -> TransformConfig:
        return stored_config(self.registry.get_bundle(bundle).transform)

    # ----------------------------------------------------------- new versions
    @reports_full_disk
    def fold(
        self,
        bundle: str,
        source: str,
        task: str,
        *,
        scale: float | None = None,
        progress: Progress | None = None,
    ) -> FoldOutcome:
        """Fold one checkpoint into ``bundle`` as ``task`` (`storage.folding`)."""
        return fold_checkpoint(self, bundle, source, task, scale=scale, progress=progress)

    @reports_full_disk
    def remove(self, bundle: str, task: str, *, progress: Progress | None = None) -> FoldOutcome:
        """Fold ``task`` out again (`storage.folding`)."""
        return remove_task(self, bundle, task, progress=progress)

    # --------------------------------------------------------------- retrieve
    def task_scale(
        self, manifest: BundleManifest, entry: TaskEntry, base: CheckpointReader
    ) -> float:
        """lambda for ``entry``: its own scale, the bundle's, else the data-free one.

        The data-free lambda (randes.scaling) needs only the norms the manifests already
        hold; ``base`` is the version's base reader, whose headers give the superposed
        tensors.
        """
        return manifest_task_scale(
            manifest, entry, base, self.base_manifest(manifest.base.name).norms
        )

    @reports_full_disk
    def materialize(
        self,
        bundle: str,
        ref: str | None,
        task: str,
        dest: Path,
        *,
        scale: float | None = None,
        progress: Progress | None = None,
        master: bool = False,
    ) -> Path:
        """Write ``task`` as a standalone Hugging Face style model directory at ``dest``.

        The model is built in a sibling temporary directory and renamed into place, so
        ``dest`` either does not exist or holds the whole model. It is retrieved from
        what the version serves (its quantized superposition, see `open_task`), or from
        the fp32 master with ``master``.
        """
        check_scale(scale)
        _, manifest = self.resolve(bundle, ref)
        with (
            self.open_task(manifest, task, master=master) as opened,
            staged_directory(dest) as staging,
        ):
            base = self.base_manifest(manifest.base.name)
            write_task(opened, manifest, base, staging, scale=scale, progress=progress)
        return dest

    @contextlib.contextmanager
    def open_task(
        self, manifest: BundleManifest, task: str, *, master: bool = False
    ) -> Iterator[OpenTask]:
        """Verified local readers for everything one task of a version is rebuilt from
        (`storage.readers.open_task`): the served superposition unless ``master``."""
        if not any(t.name == task for t in manifest.tasks):
            raise TaskNotFoundError(manifest.bundle, task)
        base = self.base_of(manifest)
        with open_task(self.files, manifest, base, task, master=master) as opened:
            yield opened

    @reports_full_disk
    def pull(
        self, bundle: str, ref: str | None, dest: Path, *, master: bool = False
    ) -> VersionRecord:
        """Download one version with every object it needs, verified (`storage.pull`)."""
        return pull_bundle(self, bundle, ref, dest, master=master)

    # --------------------------------------------------------------------- gc
    def gc(
        self, *, grace_s: float = 3600.0, dry_run: bool = False, keep_last: int | None = None
    ) -> GcReport:
        """Retention (``keep_last``), then unreferenced objects (`storage.gc.collect`)."""
        return collect(self, grace_s=grace_s, dry_run=dry_run, keep_last=keep_last)


def _base_norms(reader: CheckpointReader) -> dict[str, float]:
    """Each float tensor's L2 norm (the data-free lambda's denominator); NaN/Inf refused."""
    norms: dict[str, float] = {}
    for key in reader.keys():  # noqa: SIM118
        if not reader.meta(key).dtype.is_floating_point:
            continue
        tensor = reader.get(key)
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteTensorError(
                f"base tensor {key!r} holds NaN or Inf; a base must be finite (refused)"
            )
        norms[key] = float(tensor.double().norm())
    return norms


def _file_tensors(path: Path) -> list[str]:
    with CheckpointReader.from_files([path]) as reader:
        return sorted(reader.keys())

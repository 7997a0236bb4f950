"""The bundle lifecycle over one store + one registry: the commit protocol lives here.

Every operation that creates a version follows the same order, which is what keeps a
crash harmless at any point:

1. compute in a private work directory (nothing shared is touched);
2. lease the object keys about to be written (so a concurrent `gc` keeps them);
3. upload shards and side files (content-addressed, create-if-absent: idempotent);
4. upload the manifest (content-addressed too);
5. commit the registry row in one transaction: only now is the version visible.

A crash before 5 leaves unreferenced objects that `gc` reclaims once their lease
expires; a lost race at 5 (another fold took version n+1) rebuilds on the new head.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from randes.adapters import is_adapter, task_side_files
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig, stored_config
from randes.digests import source_digests
from randes.errors import IntegrityError, NonFiniteTensorError, RandesError
from randes.fold import check_compatible, fold, unfold
from randes.layout import superposition_metas
from randes.manifest import (
    BaseManifest,
    BaseRef,
    BundleManifest,
    ServingArtifact,
    ShardRef,
    TaskEntry,
    dump_manifest,
    load_base_manifest,
    load_bundle_manifest,
)
from randes.names import validate_name
from randes.retrieve import materialize as materialize_model
from randes.rng import new_task_seed
from randes.scaling import manifest_task_scale
from randes.serving import QuantizedReader
from randes.source import TensorSource
from randes.writer import WrittenShard
from storage.cache import ObjectCache, file_sha256, integrity_context, version_context
from storage.errors import StoreError
from storage.keys import blob_key, is_pipeline_key, manifest_key
from storage.localfs import (
    LocalFileError,
    check_destination,
    local_file_error,
    reports_full_disk,
    staged_directory,
)
from storage.pulled import pointer_json, pulled_shards
from storage.registry import (
    AlreadyIngestedError,
    BaseRecord,
    BundleRecord,
    InvalidValueError,
    NewTask,
    Registry,
    RegistryError,
    TaskExistsError,
    TaskNotFoundError,
    VersionConflictError,
    VersionRecord,
)
from storage.settings import Settings, load_settings
from storage.sources import open_configured_store, resolve_source
from storage.store import ObjectStore
from storage.store.base import sweep_tmp_files

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: stale work dirs are not swept
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

LEASE_TTL_S = 6 * 3600.0
"""How long keys written by a fold stay protected from `gc` if the fold dies uncommitted."""

MAX_SCALE = 1000.0
"""Largest lambda accepted: retrieval is theta_base + lambda * delta, and useful lambdas
are near 1; past this a retrieved weight would only hold the noise (or overflow)."""

MAX_FOLD_ATTEMPTS = 20
"""Rebuilds on a newer head before giving up when many writers race on one bundle."""

GC_INTENT_PREFIX = "gc-deleting:"
"""gc leases ``gc-deleting:<key>`` before it deletes ``<key>``: its announcement to folds."""

GC_INTENT_TTL_S = 300.0
"""How long a gc announcement lasts (a gc that dies mid-batch blocks no fold for longer)."""

GC_BATCH = 200
"""Objects announced, re-checked and deleted together."""

LEGACY_WORK_DIR_AGE_S = 24 * 3600.0
"""Work dirs without a lock file (made before they had one) are swept once this old."""


class FoldContentionError(RandesError):
    """Too many concurrent writers: every attempt lost the race for the next version."""


@dataclass(frozen=True)
class FoldOutcome:
    """What a fold or removal did. ``skipped`` means the source was already ingested."""

    bundle: str
    task: str
    version: int
    skipped: bool = False
    seed: int | None = None
    attempts: int = 1


@dataclass(frozen=True)
class GcReport:
    deleted: list[str]
    kept_young: int
    referenced: int
    swept: int = 0
    """Leftovers of writers that died mid-write: store temp files, incomplete multipart
    uploads, cache temp files."""


class Workspace:
    """One store, one registry and a local cache: what every command works on."""

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
        self.work_root = settings.resolved_cache_dir / "work"

    @classmethod
    def open(cls, settings: Settings | None = None) -> Workspace:
        """The workspace the environment describes; also applies the process-wide
        torch thread setting, since commands and flow runs enter through here."""
        import torch

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

        Same protocol as a fold: the keys are leased before anything is uploaded (a
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
            owner = uuid.uuid4().hex
            try:
                self._lease_keys(sorted({blob_key(sha) for sha in shas.values()}), owner)
                shards = [
                    self._upload_file(path, _file_tensors(path), sha=shas[path])
                    for path in reader.files
                ]
                files = {n: self._upload_file(p, [], sha=shas[p]) for n, p in side}
                manifest = BaseManifest(
                    name=name,
                    uri=resolved.uri,
                    sha256=digest,
                    shards=shards,
                    files=files,
                    norms=norms,
                )
                self._lease_keys([manifest_key(_manifest_sha(manifest))], owner)
                key, sha = self._put_manifest(manifest)
                keys = [ref.key for ref in shards] + [ref.key for ref in files.values()] + [key]
                return self.registry.add_base(
                    name, resolved.uri, digest, key, sha, object_keys=keys
                )
            finally:
                self._release(owner)

    def base_manifest(self, name: str) -> BaseManifest:
        record = self.registry.get_base(name)
        with integrity_context(f"base {name}"):
            data = self.store.get_bytes(record.manifest_key, sha256=record.manifest_sha256)
        return load_base_manifest(data)

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

    def manifest(self, version: VersionRecord) -> BundleManifest:
        with integrity_context(version_context(version.bundle, version.version)):
            data = self.store.get_bytes(version.manifest_key, sha256=version.manifest_sha256)
        return load_bundle_manifest(data)

    def resolve(self, bundle: str, ref: str | None = None) -> tuple[VersionRecord, BundleManifest]:
        record = self.registry.resolve(bundle, ref)
        return record, self.manifest(record)

    # ------------------------------------------------------------------- fold
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
        """Fold one checkpoint into ``bundle`` as ``task``: a new version, or a no-op.

        Folding the same bytes twice (under any task name) is a no-op reported as
        skipped; a lost race for the next version number rebuilds on the new head.
        """
        validate_name(task, "task name")
        _check_scale(scale)
        bundle_rec = self.registry.get_bundle(bundle)
        config = stored_config(bundle_rec.transform)
        resolved = resolve_source(source, settings=self.settings)
        with resolved.open() as checkpoint:
            # Headers first: a checkpoint they refuse is never hashed (cost: nothing,
            # whatever its size); the hash then pins what the fold reads.
            with self._base_reader(bundle_rec) as base:
                check_compatible(base, checkpoint)
            digests = source_digests(checkpoint)
            digest = digests.content
            for attempt in range(1, MAX_FOLD_ATTEMPTS + 1):
                hit = self._ledger_hit(bundle, digests.all)
                if hit is not None:
                    return FoldOutcome(bundle, hit[0], hit[1], skipped=True, attempts=attempt)
                head = self.registry.head(bundle)
                parent = self.manifest(head) if head is not None else None
                if parent is not None and any(t.name == task for t in parent.tasks):
                    raise TaskExistsError(bundle, task)
                seed = self._fresh_seed(bundle)
                version = head.version + 1 if head is not None else 1
                try:
                    with self._work_dir() as work, self._base_reader(bundle_rec) as base:
                        with self._superposition_reader(parent) as parent_reader:
                            result = fold(
                                base=base,
                                checkpoint=checkpoint,
                                parent=parent_reader,
                                seed=seed,
                                config=config,
                                out_dir=work,
                                progress=progress,
                            )
                        kind, side = task_side_files(checkpoint)
                        hashed = {  # side files hashed by source_digests, in its pass
                            checkpoint.side_files[n]: sha
                            for n, sha in checkpoint.side_sha256.items()
                        }
                        side_shas = {p: hashed.get(p) or file_sha256(p) for p in side.values()}
                        owner = uuid.uuid4().hex
                        try:
                            self._lease(
                                [*result.superposition, *result.serving, *result.private],
                                side_shas,
                                owner,
                            )
                            entry = TaskEntry(
                                name=task,
                                seed=seed,
                                source_uri=resolved.uri,
                                source_sha256=digest,
                                added_in_version=version,
                                scale=scale,
                                key_map=result.key_map,
                                delta_norms=result.delta_norms,
                                private=self._upload_shards(result.private),
                                files={
                                    # an adapter materializes as the merged model: the
                                    # base's config, the adapter's tokenizer files
                                    **(
                                        self.base_manifest(bundle_rec.base_name).files
                                        if kind == "peft-lora"
                                        else {}
                                    ),
                                    **{
                                        n: self._upload_file(p, [], sha=side_shas[p])
                                        for n, p in side.items()
                                    },
                                },
                                source_kind=kind,
                                weights_dir=checkpoint.weights_dir,
                            )
                            manifest = self._next_manifest(
                                bundle,
                                bundle_rec,
                                config,
                                head,
                                parent,
                                superposition=self._upload_shards(result.superposition),
                                tasks=[*(parent.tasks if parent else []), entry],
                                serving=self._upload_serving(config, result.serving),
                            )
                            self._commit(
                                bundle,
                                manifest,
                                owner,
                                added=[
                                    NewTask(
                                        name=task,
                                        seed=seed,
                                        source_uri=resolved.uri,
                                        source_sha256=digest,
                                    )
                                ],
                                ledger=[(digest, task)],
                            )
                        finally:
                            self._release(owner)
                except VersionConflictError:
                    log.info("bundle %s: another fold took version %d; rebuilding", bundle, version)
                    continue
                except AlreadyIngestedError:
                    continue  # the ledger lookup at the top of the loop reports it
                return FoldOutcome(bundle, task, version, seed=seed, attempts=attempt)
        raise FoldContentionError(
            f"bundle {bundle!r}: lost the race for a new version {MAX_FOLD_ATTEMPTS} times"
        )

    @reports_full_disk
    def remove(self, bundle: str, task: str, *, progress: Progress | None = None) -> FoldOutcome:
        """Fold ``task`` out again: re-fetch its source by uri, check its sha256, subtract."""
        bundle_rec = self.registry.get_bundle(bundle)
        config = stored_config(bundle_rec.transform)
        for attempt in range(1, MAX_FOLD_ATTEMPTS + 1):
            head = self.registry.head(bundle)
            parent = self.manifest(head) if head is not None else None
            entry = next((t for t in (parent.tasks if parent else []) if t.name == task), None)
            if head is None or parent is None or entry is None:
                removed = self._removed_in(bundle, task)
                if removed is not None:  # a retry of a remove that committed: a no-op
                    return FoldOutcome(bundle, task, removed, skipped=True, attempts=attempt)
                raise TaskNotFoundError(bundle, task)
            resolved = resolve_source(entry.source_uri, settings=self.settings)
            with resolved.open() as checkpoint:
                if entry.source_sha256 not in source_digests(checkpoint).all:
                    raise IntegrityError(
                        f"source of task {task!r} ({entry.source_uri}) changed since it was "
                        "folded; cannot remove it exactly"
                    )
                owner = uuid.uuid4().hex
                try:
                    with self._work_dir() as work, self._base_reader(bundle_rec) as base:
                        with self._superposition_reader(parent) as parent_reader:
                            assert parent_reader is not None or not parent.superposition
                            result = unfold(
                                base=base,
                                checkpoint=checkpoint,
                                parent=parent_reader,  # type: ignore[arg-type]
                                seed=entry.seed,
                                config=config,
                                out_dir=work,
                                progress=progress,
                            )
                        self._lease([*result.superposition, *result.serving], {}, owner)
                        remaining = [t for t in parent.tasks if t.name != task]
                        manifest = self._next_manifest(
                            bundle,
                            bundle_rec,
                            config,
                            head,
                            parent,
                            superposition=self._upload_shards(result.superposition)
                            if remaining
                            else [],
                            tasks=remaining,
                            serving=self._upload_serving(config, result.serving)
                            if remaining
                            else None,
                        )
                        self._commit(bundle, manifest, owner, removed=[task])
                except VersionConflictError:
                    continue
                finally:
                    self._release(owner)
            return FoldOutcome(bundle, task, head.version + 1, seed=entry.seed, attempts=attempt)
        raise FoldContentionError(
            f"bundle {bundle!r}: lost the race for a new version {MAX_FOLD_ATTEMPTS} times"
        )

    def _removed_in(self, bundle: str, task: str) -> int | None:
        """The version that removed ``task`` when no live task has that name, else None."""
        records = self.registry.tasks(bundle, include_removed=True)
        if any(r.name == task and r.removed_in_version is None for r in records):
            return None
        removed = [r.removed_in_version for r in records if r.name == task]
        return max((v for v in removed if v is not None), default=None)

    def _ledger_hit(self, bundle: str, digests: Sequence[str]) -> tuple[str, int] | None:
        """The ledger row of a checkpoint under any of its digests (content digest, or
        the file-bytes digest rows written before content digests hold)."""
        for digest in digests:
            hit = self.registry.ledger_lookup(bundle, digest)
            if hit is not None:
                return hit
        return None

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
        _check_scale(scale)
        _, manifest = self.resolve(bundle, ref)
        with (
            self.open_task(manifest, task, master=master) as opened,
            staged_directory(dest) as staging,
        ):
            materialize_model(
                base=opened.base,
                superposition=opened.superposition,
                private=opened.private,
                seed=opened.entry.seed,
                key_map=opened.entry.key_map,
                config=manifest.transform,
                scale=scale
                if scale is not None
                else self.task_scale(manifest, opened.entry, opened.base),
                out_dir=staging,
                side_files=opened.side_files,
                progress=progress,
                weights_dir=opened.entry.weights_dir,
            )
        return dest

    @contextlib.contextmanager
    def open_task(
        self, manifest: BundleManifest, task: str, *, master: bool = False
    ) -> Iterator[OpenTask]:
        """Verified local readers for everything one task of a version is rebuilt from.

        What materialize writes and what validation measures come from here, so both
        read (and sha256-check) exactly the same objects: the base, the superposition,
        the task's private tensors and its side files (config.json). The superposition
        is the served one: the version's quantized copy, read as the master it was
        derived from, when it has one and ``master`` is False; else the fp32 master.
        """
        try:
            entry = manifest.task(task)
        except KeyError:
            raise TaskNotFoundError(manifest.bundle, task) from None
        context = version_context(manifest.bundle, manifest.version)
        side = {n: self.cache.fetch(r, context=context, suffix="") for n, r in entry.files.items()}
        with (
            self._base_reader_for(manifest) as base,
            self._served_reader(manifest, base, master=master) as superposition,
            self._open_refs(entry.private, context) as private,
        ):
            yield OpenTask(entry, base, superposition, private, side)

    @reports_full_disk
    def pull(
        self, bundle: str, ref: str | None, dest: Path, *, master: bool = False
    ) -> VersionRecord:
        """Download one version with every object it needs, verified, as a local store.

        The result is laid out like the store itself (objects/, manifests/) plus a
        ``bundle.json`` naming the version, so it can serve offline retrieval
        (`storage.pulled`). What is served is what is pulled: a version with a quantized
        superposition comes without its fp32 master (7x smaller at int4), unless
        ``master`` asks for a complete copy, master included.
        """
        record, manifest = self.resolve(bundle, ref)
        check_destination(dest)
        base = self.base_manifest(manifest.base.name)
        this_version = version_context(bundle, record.version)
        base_context = f"base {base.name}"
        with staged_directory(dest) as staging:
            wanted: dict[str, tuple[str, str]] = {}  # key -> (sha256, what it belongs to)
            for obj in pulled_shards(manifest, master=master):
                wanted.setdefault(obj.key, (obj.sha256, this_version))
            for obj in [*base.shards, *base.files.values()]:
                wanted.setdefault(obj.key, (obj.sha256, base_context))
            wanted[record.manifest_key] = (record.manifest_sha256, this_version)
            wanted[manifest.base.manifest_key] = (manifest.base.manifest_sha256, base_context)
            for key, (sha, context) in wanted.items():
                with integrity_context(context):
                    self.store.get_file(key, staging / key, sha256=sha)
            (staging / "bundle.json").write_text(
                pointer_json(bundle, record, manifest, master=master), encoding="utf-8"
            )
        return record

    # --------------------------------------------------------------------- gc
    def gc(self, *, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Delete objects that no version or base references and no live fold leases.

        Objects younger than ``grace_s`` are kept as well: a fold that has not yet
        leased its keys (it leases before uploading) can never lose an object to gc.

        An old orphan (left by a fold that failed long ago) may be exactly what a
        running retry of that fold needs: finding it stored, the retry does not upload
        it again. So deletions go in batches, each announced first (`_delete_unclaimed`),
        and a fold, once it has leased its keys, waits out any announcement on them
        before it trusts an object already in the store (`_lease_keys`).
        """
        self._sweep_work_dirs()
        leased = self.registry.leased_keys()
        keep = self.registry.referenced_keys() | leased
        now = dt.datetime.now(dt.UTC)
        candidates: list[str] = []
        young = 0
        foreign = 0
        for info in self.store.list(""):
            if info.key in keep:
                continue
            if not is_pipeline_key(info.key):  # not ours: never deleted, never fatal
                foreign += 1
                continue
            if (now - info.last_modified).total_seconds() < grace_s:
                young += 1
                continue
            candidates.append(info.key)
        if foreign:
            log.warning("gc: left %d object(s) alone that this pipeline did not write", foreign)
        if dry_run:
            return GcReport(deleted=candidates, kept_young=young, referenced=len(keep))
        deleted: list[str] = []
        for start in range(0, len(candidates), GC_BATCH):
            deleted += self._delete_unclaimed(candidates[start : start + GC_BATCH])
        # Leftovers of writers that died mid-write (never objects): store temp files or
        # incomplete multipart uploads, and temp files of interrupted cache downloads.
        # Not fatal: the deletions are done, and a store that refuses to list uploads
        # (a bucket policy without s3:ListBucketMultipartUploads) is swept next time.
        try:
            swept = self.store.sweep_incomplete(grace_s, keep=leased)
        except StoreError as exc:
            log.warning("could not sweep incomplete uploads in %s: %s", self.store.url, exc)
            swept = 0
        swept += sweep_tmp_files(self.cache.root, grace_s)
        return GcReport(deleted=deleted, kept_young=young, referenced=len(keep), swept=swept)

    def _delete_unclaimed(self, keys: Sequence[str]) -> list[str]:
        """Delete ``keys`` except those a fold leased or a version referenced meanwhile.

        The order makes it safe against a fold that reuses a stored object: (1) lease
        ``gc-deleting:<key>`` for the batch, (2) read leases and references again,
        (3) delete the unclaimed keys, (4) release. A fold whose lease committed before
        (2) is seen there, and its objects are kept; a fold leasing after (2) sees the
        announcement from (1) and waits until (4) before it looks at the store, so an
        object deleted here is simply uploaded again.
        """
        owner = f"gc-{uuid.uuid4().hex}"
        self.registry.lease([GC_INTENT_PREFIX + k for k in keys], owner, GC_INTENT_TTL_S)
        started = time.monotonic()
        try:
            claimed = self.registry.leased_keys() | self.registry.referenced_keys()
            deleted = []
            for key in keys:
                if key in claimed:
                    continue
                if time.monotonic() - started > GC_INTENT_TTL_S / 3:
                    break  # the announcement could run out under a slow store: next run
                self.store.delete(key)
                deleted.append(key)
            return deleted
        finally:
            self._release(owner)

    # ---------------------------------------------------------------- helpers
    def _release(self, owner: str) -> None:
        """Drop ``owner``'s leases, best effort: after a commit the version is visible
        whatever happens here, and leases left behind (registry unreachable just now)
        only delay `gc` until they expire."""
        try:
            self.registry.release(owner)
        except RegistryError as exc:
            log.warning(
                "could not release leases of %s (they expire by themselves): %s", owner, exc
            )

    def _fresh_seed(self, bundle: str) -> int:
        used = self.registry.used_seeds(bundle)
        while True:
            seed = new_task_seed()
            if seed not in used:
                return seed

    @contextlib.contextmanager
    def _work_dir(self) -> Iterator[Path]:
        """A private directory ``work/<name>`` for one fold, removed when it ends.

        A fold killed outright (SIGKILL, OOM killer, power loss) cannot remove it, and
        it holds a whole superposition. So each one comes with ``work/<name>.lock``,
        flock-ed by its process from before the file is visible until the directory is
        gone: the kernel drops the lock when the process dies, and the next fold or gc
        sweeps every directory whose lock it can take (`_sweep_work_dirs`).
        """
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._sweep_work_dirs()
        name = uuid.uuid4().hex
        fd, pending = tempfile.mkstemp(dir=self.work_root, prefix=".pending-")
        lock = self.work_root / f"{name}.lock"
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(pending, lock)  # visible only once locked
            path = self.work_root / name
            path.mkdir()
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            Path(pending).unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            os.close(fd)  # releases the lock, after the directory is gone

    def _sweep_work_dirs(self) -> None:
        """Remove the work directories of folds that died without cleaning up."""
        if fcntl is None or not self.work_root.is_dir():
            return
        try:
            entries = list(self.work_root.iterdir())
        except OSError:
            return
        now = time.time()
        for entry in entries:
            try:
                if entry.suffix == ".lock":
                    self._sweep_locked(entry)
                    continue
                # A lock file never renamed into place, or a directory made before work
                # dirs had locks: nobody can prove it alive, so it goes only when old.
                unlocked = entry.name.startswith(".pending-") or (
                    entry.is_dir() and not entry.with_name(f"{entry.name}.lock").exists()
                )
                if unlocked and now - entry.stat().st_mtime > LEGACY_WORK_DIR_AGE_S:
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
            except OSError as exc:  # another sweeper got there first, permissions...
                log.debug("cannot sweep %s: %s", entry, exc)

    @staticmethod
    def _sweep_locked(lock: Path) -> None:
        assert fcntl is not None
        try:
            fd = os.open(lock, os.O_RDWR)  # never O_CREAT: a vanished lock is done with
        except FileNotFoundError:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its fold is alive
            log.info("removing the work directory of a fold that died: %s", lock.stem)
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _open_refs(
        self, refs: Sequence[ShardRef], context: str
    ) -> Iterator[CheckpointReader | None]:
        if not refs:
            yield None
            return
        paths = [self.cache.fetch(ref, context=context) for ref in refs]
        with CheckpointReader.from_files(paths) as reader:
            yield reader

    @contextlib.contextmanager
    def _base_reader(self, bundle: BundleRecord) -> Iterator[CheckpointReader]:
        manifest = self.base_manifest(bundle.base_name)
        with self._open_refs(manifest.shards, f"base {manifest.name}") as reader:
            assert reader is not None
            yield reader

    @contextlib.contextmanager
    def _base_reader_for(self, manifest: BundleManifest) -> Iterator[CheckpointReader]:
        base = self.base_manifest(manifest.base.name)
        if base.sha256 != manifest.base.sha256:
            raise IntegrityError(
                f"base {base.name!r} in the registry is not the base bundle "
                f"{manifest.bundle!r} was built on"
            )
        with self._open_refs(base.shards, f"base {base.name}") as reader:
            assert reader is not None
            yield reader

    def _superposition_reader(
        self, manifest: BundleManifest | None
    ) -> contextlib.AbstractContextManager[CheckpointReader | None]:
        if manifest is None:
            return contextlib.nullcontext(None)
        return self._open_refs(
            manifest.superposition, version_context(manifest.bundle, manifest.version)
        )

    @contextlib.contextmanager
    def _served_reader(
        self, manifest: BundleManifest, base: CheckpointReader, *, master: bool
    ) -> Iterator[TensorSource | None]:
        """The superposition a version serves: its quantized copy when it has one (unless
        ``master``), read as the master it was derived from; else the master itself."""
        if master or manifest.serving is None:
            with self._superposition_reader(manifest) as reader:
                yield reader
            return
        serving = manifest.serving
        context = version_context(manifest.bundle, manifest.version)
        with self._open_refs(serving.shards, context) as inner:
            assert inner is not None  # a ServingArtifact has at least one shard
            metas = superposition_metas(base, manifest.transform)
            with QuantizedReader(inner, serving.scheme, metas) as reader:
                yield reader

    def _lease(
        self, shards: Sequence[WrittenShard], file_shas: Mapping[Path, str], owner: str
    ) -> None:
        shas = [s.sha256 for s in shards] + list(file_shas.values())
        self._lease_keys([blob_key(sha) for sha in shas], owner)

    def _lease_keys(self, keys: Sequence[str], owner: str) -> None:
        """Protect ``keys`` from gc before storing them (see `gc`).

        A gc that announced the deletion of one of them before it could see this lease
        may still delete it: wait until it is done (at most GC_INTENT_TTL_S), so that
        the upload that follows finds the object gone and stores it again, instead of
        finding it present just before it disappears.
        """
        self.registry.lease(keys, owner, LEASE_TTL_S)
        announced = {GC_INTENT_PREFIX + key for key in keys}
        while announced & self.registry.leased_keys():
            log.info("waiting for a gc deleting objects this fold stores")
            time.sleep(0.2)

    def _upload_shards(self, shards: Sequence[WrittenShard]) -> list[ShardRef]:
        refs = []
        for shard in shards:
            key = blob_key(shard.sha256)
            # the fold's own output, hashed as written: a local store links it in
            self.store.put_file(key, shard.path, sha256=shard.sha256, move=True)
            ref = ShardRef(
                key=key, sha256=shard.sha256, size=shard.size, tensors=list(shard.tensors)
            )
            self.cache.adopt(ref, shard.path)  # the next fold's parent, without a download
            refs.append(ref)
        return refs

    def _upload_serving(
        self, config: TransformConfig, shards: Sequence[WrittenShard]
    ) -> ServingArtifact | None:
        """Upload a fold's serving shards (already leased) and describe them."""
        if config.serving is None or not shards:
            return None
        return ServingArtifact(scheme=config.serving, shards=self._upload_shards(shards))

    def _upload_file(self, path: Path, tensors: list[str], *, sha: str | None = None) -> ShardRef:
        sha = sha or file_sha256(path)
        key = blob_key(sha)
        self.store.put_file(key, path, sha256=sha)
        return ShardRef(key=key, sha256=sha, size=path.stat().st_size, tensors=tensors)

    def _put_manifest(self, manifest: BaseManifest | BundleManifest) -> tuple[str, str]:
        data = dump_manifest(manifest)
        sha = hashlib.sha256(data).hexdigest()
        key = manifest_key(sha)
        self.store.put_bytes(key, data, if_absent=True)
        return key, sha

    def _next_manifest(
        self,
        bundle: str,
        bundle_rec: BundleRecord,
        config: TransformConfig,
        head: VersionRecord | None,
        parent: BundleManifest | None,
        *,
        superposition: list[ShardRef],
        tasks: list[TaskEntry],
        serving: ServingArtifact | None = None,
    ) -> BundleManifest:
        base_rec = self.registry.get_base(bundle_rec.base_name)
        return BundleManifest(
            bundle=bundle,
            version=head.version + 1 if head is not None else 1,
            parent_version=head.version if head is not None else None,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            base=BaseRef(
                name=base_rec.name,
                uri=base_rec.uri,
                sha256=base_rec.sha256,
                manifest_key=base_rec.manifest_key,
                manifest_sha256=base_rec.manifest_sha256,
            ),
            transform=config,
            superposition=superposition,
            tasks=tasks,
            serving=serving,
        )

    def _commit(
        self,
        bundle: str,
        manifest: BundleManifest,
        owner: str,
        *,
        added: Sequence[NewTask] = (),
        removed: Sequence[str] = (),
        ledger: Sequence[tuple[str, str]] = (),
    ) -> VersionRecord:
        self._lease_keys([manifest_key(_manifest_sha(manifest))], owner)
        key, sha = self._put_manifest(manifest)
        keys = sorted({ref.key for ref in manifest.shards()} | {key})
        return self.registry.commit_version(
            bundle,
            version=manifest.version,
            parent_version=manifest.parent_version,
            manifest_key=key,
            manifest_sha256=sha,
            object_keys=keys,
            added=list(added),
            removed=list(removed),
            ledger=list(ledger),
        )


def _check_scale(scale: float | None) -> None:
    """A per-task lambda override must be a finite positive number (checked before
    anything is computed or uploaded)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidValueError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0 or scale > MAX_SCALE:
        raise InvalidValueError(
            f"scale must be a finite number greater than 0 and at most {MAX_SCALE:g}, got {scale}"
        )


def _manifest_sha(manifest: BaseManifest | BundleManifest) -> str:
    return hashlib.sha256(dump_manifest(manifest)).hexdigest()


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


@dataclass(frozen=True)
class OpenTask:
    """Readers of one task of one version (see `Workspace.open_task`)."""

    entry: TaskEntry
    base: CheckpointReader
    superposition: TensorSource | None
    private: CheckpointReader | None
    side_files: dict[str, Path]

"""The one way a new bundle version is made: `commit(store, registry, bundle, build)`.

Shaped like huggingface_hub's ``create_commit(operations, parent_commit=...)``: a
`Change` says what the new version adds and removes relative to its parent (tasks with
their seeds, ledger digests and norms; the new superposition; objects to upload), and
the commit lands only on the parent it was built from. Fold, remove and group
placement (which folds) all go through it, so every version is made in the same
order, which is what keeps a crash harmless at any point:

1. ``build(parent, work)`` computes in a private work directory (nothing shared is
   touched) and returns the `Change`;
2. lease the object keys about to be written (so a concurrent `gc` keeps them);
3. upload shards and side files (content-addressed, create-if-absent: idempotent);
4. upload the manifest (content-addressed too);
5. commit the registry row in one transaction: only now is the version visible.

A crash before 5 leaves unreferenced objects that `gc` reclaims once their lease
expires. A lost race at 5 (another writer took version n+1; the parent is no longer
the head) calls ``build`` again on the new head, up to `MAX_COMMIT_ATTEMPTS` times.
One change may add several tasks: they enter one version together, or not at all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from randes.config import stored_config
from randes.errors import RandesError
from randes.manifest import (
    BaseManifest,
    BaseRef,
    BundleManifest,
    ServingArtifact,
    ShardRef,
    TaskEntry,
    dump_manifest,
    load_bundle_manifest,
)
from randes.writer import WrittenShard
from storage.cache import ObjectCache, file_sha256, integrity_context, version_context
from storage.errors import ObjectNotFoundError
from storage.keys import blob_key, manifest_key
from storage.registry import (
    AlreadyIngestedError,
    NewTask,
    Registry,
    RegistryError,
    VersionConflictError,
    VersionRecord,
)
from storage.store import ObjectStore
from storage.workdirs import work_dir

log = logging.getLogger(__name__)

LEASE_TTL_S = 6 * 3600.0
"""How long keys written by a commit stay protected from `gc` if its writer dies."""

MAX_COMMIT_ATTEMPTS = 20
"""Rebuilds on a newer head before giving up when many writers race on one bundle."""

GC_INTENT_PREFIX = "gc-deleting:"
"""gc leases ``gc-deleting:<key>`` before it deletes ``<key>``: its announcement to writers."""


class FoldContentionError(RandesError):
    """Too many concurrent writers: every attempt lost the race for the next version."""


# ------------------------------------------------------------------ the change
@dataclass(frozen=True)
class Upload:
    """One object a commit stores: a local file and the ref its manifest records."""

    path: Path
    ref: ShardRef
    own: bool = False
    """The file is this process's output in the work directory, hashed as it was written
    (a `WrittenShard`): the store may link it in rather than copy it
    (``put_file(move=True)``), and the cache keeps it as its copy (`ObjectCache.adopt`)."""

    @classmethod
    def of_shard(cls, shard: WrittenShard) -> Upload:
        ref = ShardRef(
            key=blob_key(shard.sha256),
            sha256=shard.sha256,
            size=shard.size,
            tensors=list(shard.tensors),
        )
        return cls(shard.path, ref, own=True)

    @classmethod
    def of_file(cls, path: Path, *, sha: str | None = None, tensors: Sequence[str] = ()) -> Upload:
        sha = sha or file_sha256(path)
        ref = ShardRef(
            key=blob_key(sha), sha256=sha, size=path.stat().st_size, tensors=list(tensors)
        )
        return cls(path, ref)


@dataclass(frozen=True)
class AddTask:
    """A task a commit adds: its manifest entry (its ``added_in_version`` is set by the
    commit to the version it lands in) and the checkpoint digests the ingestion ledger
    records for it (folding those bytes again is then a no-op)."""

    entry: TaskEntry
    ledger: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    """What a new version changes relative to its parent.

    ``superposition`` (and its quantized copy ``serving``) replace the parent's whole;
    the tasks are the parent's, less ``remove``, plus ``add`` in order; ``uploads`` are
    the other objects the new entries reference (private tensors, side files). An empty
    superposition is a version without tasks.
    """

    superposition: tuple[Upload, ...] = ()
    serving: tuple[Upload, ...] = ()
    add: tuple[AddTask, ...] = ()
    remove: tuple[str, ...] = ()
    uploads: tuple[Upload, ...] = ()

    def all_uploads(self) -> list[Upload]:
        """Every object to store, in upload order (the manifest's references last)."""
        return [*self.uploads, *self.superposition, *self.serving]


@dataclass(frozen=True)
class Parent:
    """The version a change is built on (both None: the bundle's first version)."""

    record: VersionRecord | None
    manifest: BundleManifest | None

    @property
    def version(self) -> int:
        """The parent's number, 0 before the bundle's first version."""
        return self.record.version if self.record is not None else 0

    @property
    def next_version(self) -> int:
        return self.version + 1

    @property
    def tasks(self) -> list[TaskEntry]:
        return list(self.manifest.tasks) if self.manifest is not None else []


@dataclass(frozen=True)
class NoChange:
    """What a build returns when the change is already in (a retried fold or removal):
    ``task`` and the ``version`` that holds the change; nothing is committed."""

    task: str
    version: int


@dataclass(frozen=True)
class Committed:
    """What `commit` did: the new version (None when the build found nothing to do)."""

    record: VersionRecord | None
    attempts: int
    change: Change | None = None
    parent: Parent | None = None
    skipped: NoChange | None = field(default=None)


Build = Callable[[Parent, Path], "Change | NoChange"]


# ------------------------------------------------------------------ the primitive
def commit(
    store: ObjectStore,
    registry: Registry,
    bundle: str,
    build: Build,
    *,
    work_root: Path,
    max_attempts: int = MAX_COMMIT_ATTEMPTS,
    cache: ObjectCache | None = None,
) -> Committed:
    """Build a change on the bundle's head and commit it as the next version.

    ``build(parent, work)`` runs once per attempt, on the head as it is then, with a
    private work directory that lives until the upload is done; it raises to refuse
    (nothing is written) or returns `NoChange`. A lost race for the version number,
    or a ledger row another writer committed meanwhile, calls it again on the new head.
    With ``cache``, the new shards also become its cached copies (the next fold's
    parent is then read without a download).
    """
    bundle_rec = registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    for attempt in range(1, max_attempts + 1):
        head = registry.head(bundle)
        parent = Parent(head, read_manifest(store, head) if head is not None else None)
        try:
            with work_dir(work_root) as work:
                try:
                    change = build(parent, work)
                except ObjectNotFoundError:
                    # retention may delete a version that is no longer the head while a
                    # writer reads it: then the commit would lose the race anyway
                    if _head_version(registry, bundle) == parent.version:
                        raise
                    log.info("bundle %s: version %d went away; rebuilding", bundle, parent.version)
                    continue
                if isinstance(change, NoChange):
                    return Committed(None, attempt, parent=parent, skipped=change)
                base = registry.get_base(bundle_rec.base_name)
                serving = None
                if config.serving is not None and change.serving:
                    serving = ServingArtifact(
                        scheme=config.serving, shards=[u.ref for u in change.serving]
                    )
                version = parent.next_version
                added = [
                    a.entry.model_copy(update={"added_in_version": version}) for a in change.add
                ]
                removed = set(change.remove)
                manifest = BundleManifest(
                    bundle=bundle,
                    version=version,
                    parent_version=head.version if head is not None else None,
                    created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    base=BaseRef(
                        name=base.name,
                        uri=base.uri,
                        sha256=base.sha256,
                        manifest_key=base.manifest_key,
                        manifest_sha256=base.manifest_sha256,
                    ),
                    transform=config,
                    superposition=[u.ref for u in change.superposition],
                    tasks=[*(t for t in parent.tasks if t.name not in removed), *added],
                    serving=serving,
                )
                owner = new_owner()
                try:
                    lease_keys(registry, [u.ref.key for u in change.all_uploads()], owner)
                    for item in change.all_uploads():
                        upload(store, item)
                        if cache is not None and item.own:
                            cache.adopt(item.ref, item.path)
                    record = commit_manifest(
                        store,
                        registry,
                        manifest,
                        owner,
                        added=[
                            NewTask(e.name, e.seed, e.source_uri, e.source_sha256) for e in added
                        ],
                        removed=change.remove,
                        ledger=[(d, a.entry.name) for a in change.add for d in a.ledger],
                    )
                finally:
                    release(registry, owner)
        except VersionConflictError:
            log.info(
                "bundle %s: another writer took version %d; rebuilding", bundle, parent.next_version
            )
            continue
        except AlreadyIngestedError:
            continue  # the build sees the ledger row on the next attempt, and says so
        finally:
            if cache is not None:  # the work directory is gone: adopted copies are final
                cache.settle()
        return Committed(record, attempt, change=change, parent=parent)
    raise FoldContentionError(
        f"bundle {bundle!r}: lost the race for a new version {max_attempts} times"
    )


def _head_version(registry: Registry, bundle: str) -> int:
    head = registry.head(bundle)
    return head.version if head is not None else 0


def commit_manifest(
    store: ObjectStore,
    registry: Registry,
    manifest: BundleManifest,
    owner: str,
    *,
    added: Sequence[NewTask] = (),
    removed: Sequence[str] = (),
    ledger: Sequence[tuple[str, str]] = (),
) -> VersionRecord:
    """Steps 4 and 5: lease and store ``manifest``, then commit its registry row (with
    every object it references) in one transaction. Its objects are stored already."""
    lease_keys(registry, [manifest_key(manifest_sha(manifest))], owner)
    key, sha = put_manifest(store, manifest)
    keys = sorted({ref.key for ref in manifest.shards()} | {key})
    return registry.commit_version(
        manifest.bundle,
        version=manifest.version,
        parent_version=manifest.parent_version,
        manifest_key=key,
        manifest_sha256=sha,
        object_keys=keys,
        added=list(added),
        removed=list(removed),
        ledger=list(ledger),
    )


# ------------------------------------------------------------------ the steps
def read_manifest(store: ObjectStore, record: VersionRecord) -> BundleManifest:
    """A version's manifest, checked against the sha256 its registry row records."""
    with integrity_context(version_context(record.bundle, record.version)):
        data = store.get_bytes(record.manifest_key, sha256=record.manifest_sha256)
    return load_bundle_manifest(data)


def new_owner() -> str:
    """A lease owner unique to one writer."""
    return uuid.uuid4().hex


def lease_keys(registry: Registry, keys: Sequence[str], owner: str) -> None:
    """Protect ``keys`` from gc before storing (or reading) them.

    A gc that announced the deletion of one of them before it could see this lease
    may still delete it: wait until it is done (at most `storage.gc.GC_INTENT_TTL_S`),
    so that the upload that follows finds the object gone and stores it again, instead
    of finding it present just before it disappears.
    """
    registry.lease(keys, owner, LEASE_TTL_S)
    announced = {GC_INTENT_PREFIX + key for key in keys}
    while announced & registry.leased_keys():
        log.info("waiting for a gc deleting objects this writer needs")
        time.sleep(0.2)


def release(registry: Registry, owner: str) -> None:
    """Drop ``owner``'s leases, best effort: after a commit the version is visible
    whatever happens here, and leases left behind (registry unreachable just now)
    only delay `gc` until they expire."""
    try:
        registry.release(owner)
    except RegistryError as exc:
        log.warning("could not release leases of %s (they expire by themselves): %s", owner, exc)


def upload(store: ObjectStore, item: Upload) -> ShardRef:
    """Store one object under its content address (create-if-absent: idempotent)."""
    store.put_file(item.ref.key, item.path, sha256=item.ref.sha256, move=item.own)
    return item.ref


def manifest_sha(manifest: BaseManifest | BundleManifest) -> str:
    return hashlib.sha256(dump_manifest(manifest)).hexdigest()


def put_manifest(store: ObjectStore, manifest: BaseManifest | BundleManifest) -> tuple[str, str]:
    """Store a manifest under its content address; its (key, sha256)."""
    data = dump_manifest(manifest)
    sha = hashlib.sha256(data).hexdigest()
    key = manifest_key(sha)
    store.put_bytes(key, data, if_absent=True)
    return key, sha

"""Reclaiming storage: retention of old versions, unreferenced objects, dead writers' leftovers.

Every version carries a whole superposition, so history costs one superposition per
version. `gc` reclaims it in two steps:

1. retention (``keep_last``): the version rows of each bundle older than its K newest
   are deleted, except the head and every version an alias or a published status
   names (`protected_versions`). Tasks and ledger rows stay: they are history;
2. objects: every stored object that no remaining version or base references, that
   no live writer or reader leases, and that is older than ``grace_s``, is deleted in
   announced batches (`_delete_unclaimed`), then the temp files and incomplete uploads
   of writers that died mid-write and the work directories of dead folds are swept.

What stays safe meanwhile: a fold building on a version that retention deletes finds
it is no longer the head and rebuilds (`storage.commit.commit`); a pull leases every
object it copies and checks its version still exists once the lease holds
(`storage.pull`), so an object gc takes before the lease makes the pull fail in one
line, never a copy with holes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from storage.commit import GC_INTENT_PREFIX, release
from storage.errors import StoreError
from storage.keys import is_pipeline_key
from storage.registry import InvalidValueError, Registry, VersionInUseError
from storage.store.base import sweep_tmp_files
from storage.wiring import Wiring
from storage.workdirs import sweep_work_dirs

log = logging.getLogger(__name__)

GC_INTENT_TTL_S = 300.0
"""How long a gc announcement lasts (a gc that dies mid-batch blocks no fold for longer)."""

GC_BATCH = 200
"""Objects announced, re-checked and deleted together."""

RETENTION_ATTEMPTS = 5
"""Plans per bundle when aliases or publications move under retention."""


@dataclass(frozen=True)
class Retention:
    """What retention does (or would do) to one bundle's versions."""

    bundle: str
    deleted: list[int]
    kept: list[int]
    protected: dict[int, str] = field(default_factory=dict)
    """Versions kept past the K newest, and why (an alias, published, the head)."""


@dataclass(frozen=True)
class GcReport:
    deleted: list[str]
    kept_young: int
    referenced: int
    swept: int = 0
    """Leftovers of writers that died mid-write: store temp files, incomplete multipart
    uploads, cache temp files."""
    retention: list[Retention] = field(default_factory=list)
    """Per bundle, the versions retention deleted (``keep_last`` given)."""


# ------------------------------------------------------------------ retention
def protected_versions(registry: Registry, bundle: str) -> dict[int, str]:
    """The versions of ``bundle`` retention never deletes (`Registry.protected_versions`:
    what an alias names, what is published, and the head, whose number stays taken),
    each with the reasons, for the report."""
    protected = registry.protected_versions(bundle)
    why: dict[int, list[str]] = {v: [] for v in protected}
    versions = registry.list_versions(bundle)
    for alias in registry.aliases(bundle):
        why.setdefault(alias.version, []).append(f"alias {alias.name}")
    for record in versions:
        if record.status == "published":
            why.setdefault(record.version, []).append("published")
    if versions:
        why.setdefault(versions[-1].version, []).append("head")
    return {v: ", ".join(reasons) for v, reasons in sorted(why.items())}


def plan_retention(registry: Registry, bundle: str, keep_last: int) -> Retention:
    """The versions of ``bundle`` older than its ``keep_last`` newest and not protected."""
    check_keep_last(keep_last)
    numbers = [r.version for r in registry.list_versions(bundle)]
    newest = set(numbers[-keep_last:]) if keep_last else set()
    protected = protected_versions(registry, bundle)
    deleted = [v for v in numbers if v not in newest and v not in protected]
    kept = [v for v in numbers if v not in deleted]
    extra = {v: why for v, why in protected.items() if v not in newest}
    return Retention(bundle, deleted, kept, extra)


def apply_retention(
    registry: Registry, keep_last: int, *, dry_run: bool = False
) -> list[Retention]:
    """`plan_retention` for every bundle, and (unless ``dry_run``) delete the planned rows.

    The registry refuses, in the deleting transaction, a version that an alias or a
    publication came to name after the plan was made: the bundle is then planned again.
    """
    check_keep_last(keep_last)
    done = []
    for bundle in registry.list_bundles():
        for _ in range(RETENTION_ATTEMPTS):
            plan = plan_retention(registry, bundle.name, keep_last)
            if dry_run or not plan.deleted:
                break
            try:
                registry.delete_versions(bundle.name, plan.deleted)
                break
            except VersionInUseError as exc:
                log.info("retention of %s: %s; planning again", bundle.name, exc)
        else:
            log.warning("retention of %s: versions kept moving; left for the next gc", bundle.name)
            plan = Retention(bundle.name, [], plan.kept + plan.deleted, plan.protected)
        if plan.deleted:
            done.append(plan)
    return done


def check_keep_last(keep_last: int) -> None:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise InvalidValueError(f"keep-last must be a whole number of at least 1, got {keep_last}")


def _keys_freed(w: Wiring, plans: Sequence[Retention]) -> set[str]:
    """The keys that only the versions ``plans`` would delete reference (for a dry run:
    the versions still exist, so the registry's references include them)."""
    doomed = {(p.bundle, v) for p in plans for v in p.deleted}
    if not doomed:
        return set()
    freed: set[str] = set()
    kept: set[str] = set()
    for bundle in w.registry.list_bundles():
        for record in w.registry.list_versions(bundle.name):
            keys = {record.manifest_key, *(r.key for r in w.manifest(record).shards())}
            (freed if (bundle.name, record.version) in doomed else kept).update(keys)
    for base in w.registry.list_bases():
        kept.add(base.manifest_key)
        manifest = w.base_manifest(base.name)
        kept.update(r.key for r in [*manifest.shards, *manifest.files.values()])
    return freed - kept


# --------------------------------------------------------------------- objects
def collect(
    w: Wiring, *, grace_s: float = 3600.0, dry_run: bool = False, keep_last: int | None = None
) -> GcReport:
    """Delete objects that no version or base references and no live writer leases
    (after retention, with ``keep_last``: only the K newest versions of each bundle and
    the protected ones still reference theirs).

    Objects younger than ``grace_s`` are kept as well: a fold that has not yet leased
    its keys (it leases before uploading) can never lose an object to gc.

    An old orphan (left by a fold that failed long ago) may be exactly what a running
    retry of that fold needs: finding it stored, the retry does not upload it again. So
    deletions go in batches, each announced first (`_delete_unclaimed`), and a writer,
    once it has leased its keys, waits out any announcement on them before it trusts an
    object already in the store (`storage.commit.lease_keys`).
    """
    sweep_work_dirs(w.work_root)
    retention: list[Retention] = []
    if keep_last is not None:
        retention = apply_retention(w.registry, keep_last, dry_run=dry_run)
    leased = w.registry.leased_keys()
    keep = w.registry.referenced_keys() | leased
    if dry_run:
        keep -= _keys_freed(w, retention) - leased
    now = dt.datetime.now(dt.UTC)
    candidates: list[str] = []
    young = 0
    foreign = 0
    for info in w.store.list(""):
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
        return GcReport(candidates, young, len(keep), retention=retention)
    deleted: list[str] = []
    for start in range(0, len(candidates), GC_BATCH):
        deleted += _delete_unclaimed(w, candidates[start : start + GC_BATCH])
    # Leftovers of writers that died mid-write (never objects): store temp files or
    # incomplete multipart uploads, and temp files of interrupted cache downloads.
    # Not fatal: the deletions are done, and a store that refuses to list uploads
    # (a bucket policy without s3:ListBucketMultipartUploads) is swept next time.
    try:
        swept = w.store.sweep_incomplete(grace_s, keep=leased)
    except StoreError as exc:
        log.warning("could not sweep incomplete uploads in %s: %s", w.store.url, exc)
        swept = 0
    swept += sweep_tmp_files(w.cache.root, grace_s)
    return GcReport(deleted, young, len(keep), swept=swept, retention=retention)


def _delete_unclaimed(w: Wiring, keys: Sequence[str]) -> list[str]:
    """Delete ``keys`` except those a writer leased or a version referenced meanwhile.

    The order makes it safe against a fold that reuses a stored object: (1) lease
    ``gc-deleting:<key>`` for the batch, (2) read leases and references again,
    (3) delete the unclaimed keys, (4) release. A fold whose lease committed before
    (2) is seen there, and its objects are kept; a fold leasing after (2) sees the
    announcement from (1) and waits until (4) before it looks at the store, so an
    object deleted here is simply uploaded again.
    """
    import uuid

    owner = f"gc-{uuid.uuid4().hex}"
    w.registry.lease([GC_INTENT_PREFIX + k for k in keys], owner, GC_INTENT_TTL_S)
    started = time.monotonic()
    try:
        claimed = w.registry.leased_keys() | w.registry.referenced_keys()
        deleted = []
        for key in keys:
            if key in claimed:
                continue
            if time.monotonic() - started > GC_INTENT_TTL_S / 3:
                break  # the announcement could run out under a slow store: next run
            w.store.delete(key)
            deleted.append(key)
        return deleted
    finally:
        release(w.registry, owner)

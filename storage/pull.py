"""`randes pull`: versions with every object they need, verified, as one local store.

The result is laid out like the store itself (``objects/``, ``manifests/``) plus pointer
files naming the versions, so it serves offline retrieval (`storage.pulled`). What is
served is what is pulled: a version with a quantized superposition comes without its
fp32 master (7x smaller at int4), unless ``master`` asks for a complete copy.

One bundle (``bundle.json``) and a bundle group (``bundles/<member>.json`` and
``group.json``) are pulled by the same `pull_versions`: objects shared between versions
(the base, unchanged private tensors) are downloaded once.

A pull leases the keys it copies, waits out any gc deleting them, and checks its
versions still exist once the lease holds: an object that `randes gc --keep-last`
reclaims meanwhile makes the pull fail in one line, never leave a copy with holes. A
registry that refuses the lease (a read-only role on a deploy machine) is pulled from
without it, as before leases existed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from randes.manifest import BundleManifest
from storage.cache import integrity_context, version_context
from storage.commit import lease_keys, new_owner, release
from storage.localfs import check_destination, reports_full_disk, staged_directory
from storage.pulled import POINTER, pointer_json, pulled_shards
from storage.registry import RegistryError, VersionRecord
from storage.wiring import Wiring

log = logging.getLogger(__name__)


@reports_full_disk
def pull_bundle(
    w: Wiring, bundle: str, ref: str | None, dest: Path, *, master: bool = False
) -> VersionRecord:
    """One version of ``bundle`` (head, number or alias) at ``dest`` with its pointer."""
    record = w.registry.resolve(bundle, ref)
    check_destination(dest)
    with staged_directory(dest) as staging:
        [manifest] = pull_versions(w, [record], staging, master=master)
        (staging / POINTER).write_text(
            pointer_json(bundle, record, manifest, master=master), encoding="utf-8"
        )
    return record


def pull_versions(
    w: Wiring, records: Sequence[VersionRecord], staging: Path, *, master: bool
) -> list[BundleManifest]:
    """Copy every object of ``records`` (and of their bases) into ``staging``, each
    checked against its sha256; their manifests, in order."""
    with _held(w, records, [r.manifest_key for r in records]) as owner:
        manifests = []
        wanted: dict[str, tuple[str, str]] = {}  # key -> (sha256, what it belongs to)
        for record in records:
            context = version_context(record.bundle, record.version)
            manifest = w.manifest(record)
            manifests.append(manifest)
            for obj in pulled_shards(manifest, master=master):
                wanted.setdefault(obj.key, (obj.sha256, context))
            wanted[record.manifest_key] = (record.manifest_sha256, context)
            with integrity_context(context):
                base = w.base_of(manifest)
            base_context = f"base {base.name}"
            for obj in [*base.shards, *base.files.values()]:
                wanted.setdefault(obj.key, (obj.sha256, base_context))
            wanted[manifest.base.manifest_key] = (manifest.base.manifest_sha256, base_context)
        _hold(w, records, list(wanted), owner)
        for key, (sha, context) in wanted.items():
            with integrity_context(context):
                w.store.get_file(key, staging / key, sha256=sha)
    return manifests


@contextmanager
def _held(w: Wiring, records: Sequence[VersionRecord], keys: Sequence[str]) -> Iterator[str | None]:
    """Lease ``keys`` for the pull (see the module docstring); the lease owner, or None
    when the registry refuses leases."""
    owner: str | None = new_owner()
    try:
        owner = _hold(w, records, keys, owner)
        yield owner
    finally:
        if owner is not None:
            release(w.registry, owner)


def _hold(
    w: Wiring, records: Sequence[VersionRecord], keys: Sequence[str], owner: str | None
) -> str | None:
    if owner is None:
        return None
    try:
        lease_keys(w.registry, keys, owner)
    except RegistryError as exc:
        log.warning("pulling without a lease (gc may reclaim objects meanwhile): %s", exc)
        return None
    for record in records:  # VersionNotFoundError: retention took it before the lease
        w.registry.get_version(record.bundle, record.version)
    return owner

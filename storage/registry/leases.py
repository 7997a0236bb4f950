"""Leases and what gc must keep: the store keys the registry references, and the keys
writers have leased while they upload (gc deletes neither)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import delete, insert, select, union

from storage.registry.connection import RegistryCore
from storage.registry.errors import InvalidValueError
from storage.registry.models import (
    BaseModel,
    BaseObject,
    BundleVersion,
    ObjectLease,
    VersionObject,
    utcnow,
)
from storage.registry.rows import chunks, unique


class LeasesMixin(RegistryCore):
    """`Registry` methods for gc support: referenced keys and object leases."""

    def referenced_keys(self) -> set[str]:
        """Every store key some base or version references (objects and manifests)."""
        with self._tx() as s:
            query = union(
                select(VersionObject.key),
                select(BaseObject.key),
                select(BundleVersion.manifest_key),
                select(BaseModel.manifest_key),
            )
            return set(s.scalars(select(query.subquery().c[0])))

    def lease(self, keys: Sequence[str], owner: str, ttl_s: float) -> None:
        """Protect `keys` from gc for `ttl_s` seconds while `owner` writes them.

        Renewing extends the expiry. `owner` must be unique per writer (e.g. host, pid
        and a random suffix). Expired leases are pruned on the way.
        """
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise InvalidValueError(f"lease ttl must be a positive number of seconds, got {ttl_s}")
        wanted = unique(keys)
        with self._tx(write=True) as s:
            now = utcnow()
            expires = now + timedelta(seconds=ttl_s)
            s.execute(delete(ObjectLease).where(ObjectLease.expires_at <= now))
            for chunk in chunks(wanted):
                s.execute(
                    delete(ObjectLease).where(
                        ObjectLease.owner == owner, ObjectLease.key.in_(chunk)
                    )
                )
                s.execute(
                    insert(ObjectLease),
                    [{"key": k, "owner": owner, "expires_at": expires} for k in chunk],
                )

    def release(self, owner: str) -> None:
        """Drop every lease `owner` holds (after its commit, or when it gives up)."""
        with self._tx(write=True) as s:
            s.execute(delete(ObjectLease).where(ObjectLease.owner == owner))

    def leased_keys(self) -> set[str]:
        """Keys under an unexpired lease: gc must not delete them."""
        with self._tx() as s:
            return set(
                s.scalars(
                    select(ObjectLease.key).where(ObjectLease.expires_at > utcnow()).distinct()
                )
            )

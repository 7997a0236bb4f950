"""Base models and bundles: registering a base with its store keys, creating bundles
over it, and reading both back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from randes.names import validate_name
from storage.registry.connection import RegistryCore
from storage.registry.errors import BaseExistsError, BundleExistsError, BundleNotFoundError
from storage.registry.models import UQ_BASE_NAME, UQ_BUNDLE_NAME, BaseModel, BaseObject, Bundle
from storage.registry.records import BaseRecord, BundleRecord
from storage.registry.rows import (
    all_with_base,
    base_record,
    base_row,
    bundle_record,
    check_finite,
    insert_over_base,
    inserted,
    one_with_base,
    raising_on,
    unique,
    violated,
)


class BundlesMixin(RegistryCore):
    """`Registry` methods for base models and bundles."""

    def add_base(
        self,
        name: str,
        uri: str,
        sha256: str,
        manifest_key: str,
        manifest_sha256: str,
        object_keys: Sequence[str],
    ) -> BaseRecord:
        """Register a base model and the store keys it references.

        Idempotent: registering the same name with the same sha256 again returns the
        existing record (whatever the uri); a different sha256 raises BaseExistsError.
        """
        validate_name(name, "base name")
        try:
            with self._tx(write=True) as s:
                existing = s.scalar(select(BaseModel).where(BaseModel.name == name))
                if existing is not None:
                    if existing.sha256 != sha256:
                        raise BaseExistsError(name, existing.sha256, sha256)
                    return base_record(existing)
                row = inserted(
                    s,
                    BaseModel(
                        name=name,
                        uri=uri,
                        sha256=sha256,
                        manifest_key=manifest_key,
                        manifest_sha256=manifest_sha256,
                    ),
                )
                keys = unique(object_keys)
                if keys:
                    s.execute(
                        insert(BaseObject),
                        [{"base_id": row.id, "key": k} for k in keys],
                    )
                return base_record(row)
        except IntegrityError as exc:
            if violated(exc) != UQ_BASE_NAME:
                raise
        # Another writer registered the name between our check and our insert.
        winner = self.get_base(name)
        if winner.sha256 != sha256:
            raise BaseExistsError(name, winner.sha256, sha256)
        return winner

    def get_base(self, name: str) -> BaseRecord:
        with self._tx() as s:
            return base_record(base_row(s, name))

    def list_bases(self) -> list[BaseRecord]:
        with self._tx() as s:
            rows = s.scalars(select(BaseModel).order_by(BaseModel.name))
            return [base_record(r) for r in rows]

    def create_bundle(
        self,
        name: str,
        base_name: str,
        transform: dict[str, Any],
        gate_threshold: float | None = None,
    ) -> BundleRecord:
        """Create an (empty, version-less) bundle over a registered base."""
        validate_name(name, "bundle name")
        gate_threshold = check_finite("gate_threshold", gate_threshold)
        exists = BundleExistsError(name)
        with raising_on(UQ_BUNDLE_NAME, exists), self._tx(write=True) as s:
            row, base = insert_over_base(
                s,
                Bundle,
                name,
                base_name,
                exists,
                transform=dict(transform),
                gate_threshold=gate_threshold,
            )
            return bundle_record(row, base)

    def get_bundle(self, name: str) -> BundleRecord:
        with self._tx() as s:
            return bundle_record(*one_with_base(s, Bundle, name, BundleNotFoundError(name)))

    def list_bundles(self) -> list[BundleRecord]:
        with self._tx() as s:
            return [bundle_record(b, base) for b, base in all_with_base(s, Bundle)]

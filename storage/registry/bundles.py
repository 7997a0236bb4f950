"""Base models and bundles: registering a base with its store keys, creating bundles
over it, and reading both back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from randes.names import validate_name
from storage.registry.connection import RegistryCore
from storage.registry.errors import (
    BaseExistsError,
    BundleExistsError,
    BundleNotFoundError,
    RegistryError,
)
from storage.registry.models import UQ_BASE_NAME, UQ_BUNDLE_NAME, BaseModel, BaseObject, Bundle
from storage.registry.records import BaseRecord, BundleRecord
from storage.registry.rows import (
    base_record,
    base_row,
    bundle_record,
    check_finite,
    inserted,
    raising_on,
    unique,
    violated,
    with_base_name,
)

R = TypeVar("R")


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
        gate = check_finite("gate_threshold", gate_threshold)
        row = Bundle(name=name, transform=dict(transform), gate_threshold=gate)
        return self._create_over_base(
            row, base_name, bundle_record, BundleExistsError(name), UQ_BUNDLE_NAME
        )

    def get_bundle(self, name: str) -> BundleRecord:
        return self._get_over_base(Bundle, bundle_record, name, BundleNotFoundError(name))

    def list_bundles(self) -> list[BundleRecord]:
        return self._list_over_base(Bundle, bundle_record)

    # -- what bundles and groups share: a named row over a base -------------------------

    def _create_over_base(
        self,
        row: Any,
        base_name: str,
        record: Callable[[Any, str], R],
        exists: RegistryError,
        constraint: str,
    ) -> R:
        """Insert ``row`` (a new bundle or group) over the registered base ``base_name``
        and return its record: BaseNotFoundError, or ``exists`` when its name is taken
        (seen by the check, or by `constraint` when a racing writer won)."""
        model = type(row)
        with raising_on(constraint, exists), self._tx(write=True) as s:
            base = base_row(s, base_name)
            if s.scalar(select(model.id).where(model.name == row.name)) is not None:
                raise exists
            row.base_id = base.id
            return record(inserted(s, row), base.name)

    def _get_over_base(
        self, model: Any, record: Callable[[Any, str], R], name: str, missing: RegistryError
    ) -> R:
        """The record of the `model` row named ``name``, or ``missing`` raised."""
        with self._tx() as s:
            row = s.execute(with_base_name(model).where(model.name == name)).one_or_none()
            if row is None:
                raise missing
            return record(row[0], row[1])

    def _list_over_base(self, model: Any, record: Callable[[Any, str], R]) -> list[R]:
        """The records of every `model` row, by name."""
        with self._tx() as s:
            return [
                record(r, base) for r, base in s.execute(with_base_name(model).order_by(model.name))
            ]

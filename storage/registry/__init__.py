"""The SQL registry of bases, bundles, versions, tasks, evaluations and aliases.

`Registry` is the only entry point the rest of the project needs; the schema lives in
`storage.registry.models` and changes only through the Alembic migrations in the
top-level `migrations` package (`Registry.upgrade()`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage.registry.errors import (
    AliasNotFoundError,
    AlreadyIngestedError,
    BaseExistsError,
    BaseNotFoundError,
    BundleExistsError,
    BundleNotFoundError,
    DatabaseUnavailableError,
    GroupExistsError,
    GroupMemberConflictError,
    GroupNotFoundError,
    InvalidValueError,
    MigrationError,
    NotFoundError,
    RegistryError,
    RejectedVersionError,
    SchemaNotInitializedError,
    SeedConflictError,
    TaskExistsError,
    TaskNotFoundError,
    VersionConflictError,
    VersionInUseError,
    VersionNotFoundError,
)
from storage.registry.records import (
    AliasRecord,
    BaseRecord,
    BundleRecord,
    EvaluationRecord,
    GroupRecord,
    NewTask,
    TaskRecord,
    VersionRecord,
    VersionStatus,
)

if TYPE_CHECKING:
    from storage.registry.models import VERSION_STATUSES
    from storage.registry.registry import Registry

_NEED_SQLALCHEMY = {
    "VERSION_STATUSES": "storage.registry.models",
    "Registry": "storage.registry.registry",
}
"""Imported on first use: a process that only serves pulled bundles (storage.runtime)
needs the errors and records, not SQLAlchemy (~20 MB of its RSS)."""


def __getattr__(name: str) -> Any:
    module = _NEED_SQLALCHEMY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "VERSION_STATUSES",
    "AliasNotFoundError",
    "AliasRecord",
    "AlreadyIngestedError",
    "BaseExistsError",
    "BaseNotFoundError",
    "BaseRecord",
    "BundleExistsError",
    "BundleNotFoundError",
    "BundleRecord",
    "DatabaseUnavailableError",
    "EvaluationRecord",
    "GroupExistsError",
    "GroupMemberConflictError",
    "GroupNotFoundError",
    "GroupRecord",
    "InvalidValueError",
    "MigrationError",
    "NewTask",
    "NotFoundError",
    "Registry",
    "RegistryError",
    "RejectedVersionError",
    "SchemaNotInitializedError",
    "SeedConflictError",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskRecord",
    "VersionConflictError",
    "VersionInUseError",
    "VersionNotFoundError",
    "VersionRecord",
    "VersionStatus",
]

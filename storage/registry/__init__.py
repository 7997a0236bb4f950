"""The SQL registry of bases, bundles, versions, tasks, evaluations and aliases.

`Registry` is the only entry point the rest of the project needs; the schema lives in
`storage.registry.models` and changes only through the Alembic migrations in the
top-level `migrations` package (`Registry.upgrade()`).
"""

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
from storage.registry.models import VERSION_STATUSES
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
from storage.registry.registry import Registry

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

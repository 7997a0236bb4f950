"""Errors of the SQL registry.

Each constraint the database enforces has its own exception, so a caller can tell
"another fold won the race, rebuild on the new head" (`VersionConflictError`) from
"this checkpoint is already in the bundle, nothing to do" (`AlreadyIngestedError`)
without parsing driver messages. All derive from `RandesError`, so the command line
prints them as one line.
"""

from __future__ import annotations

from randes.errors import RandesError


class RegistryError(RandesError):
    """Base class of every error the registry raises."""


class InvalidValueError(RegistryError, ValueError):
    """An argument the registry refuses before touching the database
    (unknown status, seed out of the 64-bit range, alias name made of digits...)."""


class DatabaseUnavailableError(RegistryError):
    """The registry database cannot be reached or opened.

    The message names the URL with its password hidden, never the password itself.
    """


class SchemaNotInitializedError(RegistryError):
    """The database is reachable but has no registry schema (or an older one).

    Fixed by `randes init` (`Registry.upgrade()`).
    """


class MigrationError(RegistryError):
    """A schema migration failed; it ran in one transaction, so nothing changed."""


# -- lookups --------------------------------------------------------------------------


class NotFoundError(RegistryError, LookupError):
    """A named registry object does not exist."""


class _NamedObjectError(RegistryError):
    """An error about one named object: ``what`` is its message, ``{name!r}`` in it."""

    what = "{name!r}"

    def __init__(self, name: str) -> None:
        super().__init__(self.what.format(name=name))
        self.name = name


class BaseNotFoundError(_NamedObjectError, NotFoundError):
    what = "base model {name!r} is not registered"


class BundleNotFoundError(_NamedObjectError, NotFoundError):
    what = "bundle {name!r} does not exist"


class GroupNotFoundError(_NamedObjectError, NotFoundError):
    what = "bundle group {name!r} does not exist"


class VersionNotFoundError(NotFoundError):
    def __init__(self, bundle: str, version: int | None) -> None:
        if version is None:
            msg = f"bundle {bundle!r} has no version yet"
        else:
            msg = f"bundle {bundle!r} has no version {version}"
        super().__init__(msg)
        self.bundle = bundle
        self.version = version


class TaskNotFoundError(NotFoundError):
    def __init__(self, bundle: str, task: str) -> None:
        super().__init__(f"bundle {bundle!r} has no task {task!r}")
        self.bundle = bundle
        self.task = task


class AliasNotFoundError(NotFoundError):
    def __init__(self, bundle: str, alias: str) -> None:
        super().__init__(f"bundle {bundle!r} has no alias {alias!r}")
        self.bundle = bundle
        self.alias = alias


# -- conflicts ------------------------------------------------------------------------


class BaseExistsError(RegistryError):
    """A base of that name is registered with different content (sha256)."""

    def __init__(self, name: str, existing_sha256: str, new_sha256: str) -> None:
        super().__init__(
            f"base model {name!r} is already registered with sha256 {existing_sha256}, "
            f"not {new_sha256}"
        )
        self.name = name
        self.existing_sha256 = existing_sha256
        self.new_sha256 = new_sha256


class BundleExistsError(_NamedObjectError):
    what = "bundle {name!r} already exists"


class GroupExistsError(_NamedObjectError):
    what = "bundle group {name!r} already exists"


class GroupMemberConflictError(RegistryError):
    """Another placement added a member to the group since this one looked at it.

    A placement reacts by looking at the members again: the new one may have room.
    """

    def __init__(self, group: str, position: int) -> None:
        super().__init__(
            f"member {position} of bundle group {group!r} was created by another writer"
        )
        self.group = group
        self.position = position


class VersionConflictError(RegistryError):
    """Another writer took that version number (or the writer's head is stale).

    An optimistic fold reacts by re-reading the head and rebuilding on it.
    """

    def __init__(self, bundle: str, version: int, head: int | None = None) -> None:
        if head is None:
            msg = f"version {version} of bundle {bundle!r} was committed by another writer"
        else:
            msg = (
                f"cannot commit version {version} of bundle {bundle!r}: its head is "
                f"version {head}, so the next version is {head + 1}"
            )
        super().__init__(msg)
        self.bundle = bundle
        self.version = version
        self.head = head


class TaskExistsError(RegistryError):
    """A live task of that name is already in the bundle."""

    def __init__(self, bundle: str, task: str) -> None:
        super().__init__(f"bundle {bundle!r} already has a task {task!r}")
        self.bundle = bundle
        self.task = task


class SeedConflictError(RegistryError):
    """The seed was already used in the bundle (seeds are never reused, even after removal)."""

    def __init__(self, bundle: str, seed: int | None) -> None:
        what = "a seed" if seed is None else f"seed {seed}"
        super().__init__(f"{what} is already used in bundle {bundle!r}")
        self.bundle = bundle
        self.seed = seed


class AlreadyIngestedError(RegistryError):
    """That checkpoint (by sha256) was already folded into the bundle.

    Carries where it went, so an ingestion can report it and treat it as a no-op.
    """

    def __init__(
        self, bundle: str, source_sha256: str, task_name: str | None, version: int | None
    ) -> None:
        where = (
            f" as task {task_name!r} in version {version}"
            if task_name is not None
            else " by another writer"
        )
        super().__init__(
            f"checkpoint {source_sha256} was already ingested into bundle {bundle!r}{where}"
        )
        self.bundle = bundle
        self.source_sha256 = source_sha256
        self.task_name = task_name
        self.version = version


class RejectedVersionError(RegistryError):
    """Publishing (or aliasing) a version that did not pass validation."""

    def __init__(self, bundle: str, version: int, status: str) -> None:
        super().__init__(
            f"version {version} of bundle {bundle!r} is {status}: only a validated "
            "version can be published"
        )
        self.bundle = bundle
        self.version = version
        self.status = status


class VersionInUseError(RegistryError):
    """Deleting a version that an alias names, or the head (whose number must stay taken)."""

    def __init__(self, bundle: str, version: int, reason: str) -> None:
        super().__init__(f"cannot delete version {version} of bundle {bundle!r}: {reason}")
        self.bundle = bundle
        self.version = version
        self.reason = reason

"""The registry facade: typed methods over the SQL schema, one short transaction each.

Why a facade and not sessions in the flows: every rule that keeps the registry
consistent under concurrent writers lives here, next to the constraints that back it
(see `commit_version`), and callers get immutable records and specific exceptions
instead of ORM objects and driver errors.

Concurrency model (see DESIGN.md, "Folding is optimistic"): a fold reads head n, builds
n + 1 in the store, then calls `commit_version(version=n + 1)`. Within that one
transaction the registry re-checks the ledger and the head, then inserts; whichever
writer loses gets `AlreadyIngestedError` (same checkpoint) or `VersionConflictError`
(rebuild on the new head). SQLite serializes writers (``BEGIN IMMEDIATE``), so the
checks are exact; PostgreSQL runs them concurrently and the unique constraints decide,
each violation being mapped to the same exceptions.

Why mixins: the facade is one class to its callers (workspace, groups, queries, flows),
but each concept is its own module under 500 lines, composed here:

- `connection.RegistryCore`: engine and URL, migrations (`upgrade`), transactions,
  driver-error mapping, URL redaction;
- `bundles.BundlesMixin`: base models and bundles;
- `groups.GroupsMixin`: bundle groups and their members (over `BundlesMixin`, whose
  create/get/list over a base both use);
- `versions.VersionsMixin`: versions, status, aliases, retention
  (`protected_versions`, `delete_versions`);
- `tasks.TasksMixin`: `commit_version`, tasks and the ingestion ledger;
- `evaluations.EvaluationsMixin`: evaluations;
- `leases.LeasesMixin`: referenced keys and object leases (gc support);
- `validation.ValidationMixin`: what validations measured and why, and each bundle's
  validation policy;
- `rows`: the lookups, record conversion and checks they all share.
"""

from __future__ import annotations

from storage.registry.connection import migrations_dir
from storage.registry.evaluations import EvaluationsMixin
from storage.registry.groups import GroupsMixin
from storage.registry.leases import LeasesMixin
from storage.registry.rows import GROUP_NAME_MAX, INT32_MAX
from storage.registry.tasks import TasksMixin
from storage.registry.validation import ValidationMixin
from storage.registry.versions import VersionsMixin

__all__ = ["GROUP_NAME_MAX", "INT32_MAX", "Registry", "migrations_dir"]


class Registry(
    GroupsMixin,  # and BundlesMixin, its base
    VersionsMixin,
    TasksMixin,
    EvaluationsMixin,
    LeasesMixin,
    ValidationMixin,
):
    """Typed access to the registry database (SQLite or PostgreSQL through psycopg 3).

    Thread-safe (one engine, a session per call) and cheap to keep for a process's
    lifetime; `close()` (or ``with Registry(url) as reg:``) disposes the pool. A
    Registry must not cross `fork()`: create one per process.
    """

"""Options every task of the flows shares: retries for outages, never for bad input.

Idempotence does not rely on Prefect's cache (the registry's ledger is the cache), so
results are neither cached nor persisted.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from storage.errors import StoreUnavailableError
from storage.registry import DatabaseUnavailableError

TRANSIENT = (StoreUnavailableError, DatabaseUnavailableError, ConnectionError, TimeoutError)
RETRY_DELAYS = [2, 5, 10]


def retry_transient_only(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry store / database outages; never retry a refusal of bad input."""
    try:
        state.result()
    except TRANSIENT:
        return True
    except BaseException:  # noqa: BLE001 - anything else is final
        return False
    return False


def task_options() -> dict[str, Any]:
    return {
        "retries": len(RETRY_DELAYS),
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": retry_transient_only,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }

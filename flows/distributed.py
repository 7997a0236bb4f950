"""Ingestion spread over a Dask cluster: scramble on the workers, reduce once.

The per-checkpoint work of an ingest (fetch, verify the bytes, scramble the delta) maps
over prefect-dask's `DaskTaskRunner` connected to the user's scheduler; each worker
writes its checkpoint's scrambled delta to the store (storage.partials), and one reduce
step adds the deltas to the head in the checkpoints' order and commits one version:
the bytes a single-process batch fold, or sequential folds, give for the same seeds.

Workers open their own `Workspace` from their environment, as Prefect workers do:
start them with the same ``RANDES_*`` settings as the flow (the store and registry must
be reachable from every worker; a local store only from workers on the same machine).
No setting travels in task parameters, which Prefect records.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from prefect import flow, get_run_logger, task, unmapped

from flows.task_options import task_options
from randes.errors import RandesError
from storage.batch import BatchItem, BatchOutcome, fresh_seeds
from storage.partials import MapResult, drop_partials, reduce_partials, scramble_to_store
from storage.workspace import Workspace


@task(name="scramble-checkpoint", **task_options())
def scramble_checkpoint(bundle: str, item: BatchItem, seed: int, owner: str) -> MapResult:
    with Workspace.open() as ws:
        return scramble_to_store(ws, bundle, item, seed, owner)


@flow(name="scramble-checkpoints")
def scramble_checkpoints(
    bundle: str, items: list[BatchItem], seeds: list[int], owner: str
) -> list[MapResult]:
    """The map step: one task per checkpoint, on the flow's task runner."""
    futures = scramble_checkpoint.map(unmapped(bundle), items, seeds, unmapped(owner))
    return [f.result() for f in futures]


@task(name="reduce-partials", **task_options())
def reduce_step(bundle: str, results: list[MapResult]) -> BatchOutcome:
    with Workspace.open() as ws:
        return reduce_partials(ws, bundle, [r.partial for r in results if r.partial])


def fold_on_dask(bundle: str, items: Sequence[BatchItem], address: str) -> BatchOutcome:
    """Fold ``items`` into ``bundle`` as one version, scrambled on the Dask cluster at
    ``address``; called inside a flow run (the map step is a subflow)."""
    from prefect_dask import DaskTaskRunner

    with Workspace.open() as ws:
        seeds = fresh_seeds(ws.registry, bundle, len(items))
    owner = f"ingest-{uuid.uuid4().hex}"
    runner = DaskTaskRunner(address=address)
    logger = get_run_logger()
    started = time.perf_counter()
    results = scramble_checkpoints.with_options(task_runner=runner)(  # type: ignore[arg-type]
        bundle, list(items), seeds, owner
    )
    mapped = time.perf_counter()
    logger.info("scrambled %d checkpoints on %s in %.1f s", len(items), address, mapped - started)
    try:
        outcome = reduce_step(bundle, results)
        logger.info("reduced in %.1f s", time.perf_counter() - mapped)
    finally:
        with Workspace.open() as ws:
            drop_partials(ws, [r.partial for r in results if r.partial], owner)
    outcome.skipped = {
        **{r.task: r.skipped for r in results if r.skipped is not None},
        **outcome.skipped,
    }
    for r in results:
        if r.refused is not None:
            outcome.refused[r.task] = RandesError(r.refused)
    return outcome

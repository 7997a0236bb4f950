"""Prefect flows: ingest, validate, publish. Thin flows over small, retried tasks.

Idempotence does not rely on Prefect's cache: the ingestion ledger in the registry
is the cache (a checkpoint already folded is a no-op), so a flow run that crashed
half-way is completed by simply running it again. Task retries are reserved for
transient faults (store or database unreachable); bad input fails at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from flows.discovery import Candidate, discover
from flows.validation import (
    TaskValidation,
    ValidationReport,
    load_evaluator,
    plan,
    report_markdown,
    validate_task,
)
from randes.errors import RandesError
from randes.validation_policy import Decision
from storage.errors import StoreUnavailableError
from storage.invariants import version_problems
from storage.registry import DatabaseUnavailableError
from storage.registry.validation import CheckRow
from storage.settings import load_settings
from storage.workspace import FoldOutcome, Workspace


class IngestRefusedError(RandesError):
    """Some checkpoints of an ingest were refused; the others were folded."""


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


def _task_options() -> dict[str, Any]:
    return {
        "retries": len(RETRY_DELAYS),
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": retry_transient_only,
        "cache_policy": NO_CACHE,
        "persist_result": False,
    }


@task(name="discover-checkpoints", **_task_options())
def discover_checkpoints(source: str) -> list[Candidate]:
    return discover(source, settings=load_settings())


@task(name="fold-checkpoint", **_task_options())
def fold_checkpoint(bundle: str, candidate: Candidate) -> FoldOutcome:
    with Workspace.open() as ws:
        return ws.fold(bundle, candidate.source, candidate.task)


@task(name="place-checkpoint", **_task_options())
def place_checkpoint(group: str, candidate: Candidate) -> FoldOutcome:
    """Fold into the member of ``group`` with room for it (storage.groups.place); the
    outcome names that member as its bundle."""
    from storage.groups import place

    with Workspace.open() as ws:
        return place(ws, group, candidate.source, candidate.task).outcome


@task(name="validate-task", **_task_options())
def validate_one(
    bundle: str, version: int, task_name: str, evaluator: str | None, scale: float | None
) -> TaskValidation:
    function = load_evaluator(evaluator) if evaluator else None
    with Workspace.open() as ws:
        return validate_task(ws, bundle, version, task_name, evaluator=function, scale=scale)


@task(name="record-validation", **_task_options())
def record_validation(report: ValidationReport) -> str:
    failing = set(report.failing)
    with Workspace.open() as ws:
        # what was measured and why, what was skipped: the next selection's history
        ws.registry.record_checks(
            report.bundle,
            report.version,
            [CheckRow(d, d.task not in failing) for d in report.decisions],
        )
        for t in report.tasks:
            if t.metric is not None and t.value is not None:
                ws.registry.add_evaluation(
                    report.bundle,
                    report.version,
                    t.task,
                    t.metric,
                    t.value,
                    reference=t.reference,
                    normalized=t.normalized,
                )
            if t.delta_cosine is not None:
                ws.registry.add_evaluation(
                    report.bundle, report.version, t.task, "delta_cosine", t.delta_cosine
                )
        current = ws.registry.get_version(report.bundle, report.version).status
        if not report.passed:
            status = "rejected"
        elif current == "published":
            status = current  # re-validating what an alias serves must not unpublish it
        else:
            status = "validated"
        if status != current:
            ws.registry.set_status(report.bundle, report.version, status)
    return status


@flow(name="validate", log_prints=True)
def validate_flow(
    bundle: str,
    version: int | None = None,
    evaluator: str | None = None,
    scale: float | None = None,
    everything: bool = False,
    drift: float | None = None,
    window: int | None = None,
    sample: int | None = None,
) -> ValidationReport:
    """Measure the tasks of a version its validation policy selects, and gate the version.

    The bundle's policy (`randes bundle validation`), with ``drift`` / ``window`` /
    ``sample`` overriding it for this run; ``everything`` measures every task."""
    with Workspace.open() as ws:
        record, manifest = ws.resolve(bundle, None if version is None else str(version))
        threshold = ws.registry.get_bundle(bundle).gate_threshold
        policy = ws.registry.validation_policy(bundle).overridden(
            drift=drift, window=window, sample=sample
        )
        # The gate's first condition: the version is whole (objects present, finite,
        # base-shaped); a broken one is rejected without measuring its tasks.
        problems = version_problems(ws, manifest)
        decisions: list[Decision] = (
            [] if problems else plan(ws, manifest, policy, everything=everything)
        )
    futures = [
        validate_one.submit(bundle, record.version, d.task, evaluator, scale)
        for d in decisions
        if d.measured
    ]
    report = ValidationReport(
        bundle,
        record.version,
        threshold,
        [f.result() for f in futures],
        problems,
        decisions,
        None if everything else policy,
    )
    status = record_validation(report)
    key = f"{bundle}-validation".lower().replace("_", "-").replace(".", "-")
    measured = {t.task: t for t in report.tasks}
    create_table_artifact(
        key=key,
        table=[_artifact_row(d, measured.get(d.task)) for d in decisions],
        description=f"{bundle} version {record.version}: {status}, measured "
        f"{len(report.tasks)} of {len(decisions)} tasks",
    )
    create_markdown_artifact(key=f"{key}-summary", markdown=report_markdown(report))
    logger = get_run_logger()
    logger.info(
        "%s version %d: %s; measured %d of %d tasks (%s)",
        bundle,
        record.version,
        status,
        len(report.tasks),
        len(decisions),
        ", ".join(f"{reason} {n}" for reason, n in Counter(d.reason for d in decisions).items())
        or "none",
    )
    return report


def _artifact_row(decision: Decision, measured: TaskValidation | None) -> dict[str, Any]:
    """One task of the version: why it was (not) measured, and what it measured."""
    row: dict[str, Any] = {
        "task": decision.task,
        "measured": decision.measured,
        "reason": decision.reason,
        "why": decision.detail,
        "interference": decision.interference,
        "last_validated": decision.last_version,
    }
    # the same columns on every row (a skipped task's measurements empty)
    values = measured.row() if measured is not None else {}
    row |= {f.name: values.get(f.name) for f in fields(TaskValidation) if f.name != "task"}
    return row


@flow(name="ingest", log_prints=True)
def ingest_flow(
    bundle: str | None,
    source: str,
    evaluator: str | None = None,
    run_validation: bool = True,
    group: str | None = None,
    validate_all: bool = False,
    drift: float | None = None,
    window: int | None = None,
    sample: int | None = None,
) -> dict[str, Any]:
    """Fold every checkpoint under ``source`` that the ledger does not hold yet.

    With ``group`` (and ``bundle`` None), each checkpoint is placed in the group's
    member with room for it (storage.groups), and every member that changed is
    validated. Validation measures what each bundle's policy selects (every checkpoint
    folded now is new, so always measured); ``validate_all`` and ``drift`` / ``window``
    / ``sample`` are `validate_flow`'s.
    """
    if (bundle is None) == (group is None):
        raise RandesError("ingest needs exactly one of a bundle and a group")
    target = bundle if group is None else group
    logger = get_run_logger()
    candidates = discover_checkpoints(source)
    folded: list[FoldOutcome] = []
    skipped: list[FoldOutcome] = []
    refused: list[str] = []
    for candidate in candidates:  # sequential: each fold builds on the previous head
        if candidate.refusal is not None:
            refused.append(f"{candidate.task!r}: {candidate.refusal}")
            logger.error("refused %s", refused[-1])
            continue
        if group is not None:
            state = place_checkpoint(group, candidate, return_state=True)
        else:
            assert bundle is not None
            state = fold_checkpoint(bundle, candidate, return_state=True)
        try:
            outcome = state.result()
        except TRANSIENT:
            raise  # the store or database is down: stop, the next run resumes
        except RandesError as exc:
            # One bad checkpoint must not starve the ones sorted after it on every
            # scheduled run: refuse it, fold the rest, fail the run at the end.
            refused.append(f"{candidate.task}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
            logger.error("refused %s", refused[-1])
            continue
        (skipped if outcome.skipped else folded).append(outcome)
        logger.info(
            "%s: %s",
            candidate.task,
            "already folded" if outcome.skipped else f"version {outcome.version}",
        )
    heads = {o.bundle: o.version for o in folded}  # the last new version of each bundle
    reports = (
        [
            validate_flow(b, v, evaluator, None, validate_all, drift, window, sample)
            for b, v in heads.items()
        ]
        if run_validation
        else []
    )
    folded_names = [o.task for o in folded]
    summary: dict[str, Any] = {
        "bundle": bundle,
        "group": group,
        "found": len(candidates),
        "folded": folded_names,
        "skipped": [o.task for o in skipped],
        "version": folded[-1].version if folded else None,
        "status": None
        if not reports
        else ("validated" if all(r.passed for r in reports) else "rejected"),
        "refused": refused,
        "placed": {o.task: f"{o.bundle}@{o.version}" for o in [*folded, *skipped]},
        "validation": {
            r.bundle: {
                "version": r.version,
                "measured": [t.task for t in r.tasks],
                "skipped": [d.task for d in r.decisions if not d.measured],
            }
            for r in reports
        },
    }
    create_markdown_artifact(
        key=f"{target}-ingest".lower().replace("_", "-").replace(".", "-"),
        markdown=(
            f"# Ingest into {target}\n\nfound {len(candidates)}, folded {len(folded)} "
            f"({', '.join(folded_names) or '-'}), already present {len(skipped)}; "
            f"head version {summary['version']}, status {summary['status']}"
            + "".join(
                f"\n- {r.bundle} version {r.version}: measured {len(r.tasks)} of "
                f"{len(r.decisions)} tasks"
                for r in reports
            )
            + "".join(f"\n- refused {line}" for line in refused)
        ),
    )
    if refused:
        raise IngestRefusedError(
            f"{target}: folded {len(folded)}, refused {len(refused)}: " + "; ".join(refused)
        )
    return summary


@flow(name="publish")
def publish_flow(bundle: str, version: int, alias: str = "production") -> dict[str, Any]:
    """Move ``alias`` to a validated version, atomically (one registry transaction)."""
    with Workspace.open() as ws:
        record = ws.registry.set_alias(bundle, alias, version)
    return {"bundle": bundle, "alias": record.name, "version": record.version}

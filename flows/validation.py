"""Validation of a bundle version: retrieve the tasks its policy selects and measure them.

Which tasks: randes.validation_policy (new ones, those whose predicted interference
moved, a rotating sample of the rest; every task with ``everything``). `plan` reads what
that choice needs (the version's manifest, the base norms, the registry's last checks);
the report says for every task whether it was measured and why.

Two measurements, both optional by what is at hand:

- delta fidelity: cosine and relative error of the retrieved delta against the
  source delta (needs the task's source, fetched again by its pinned uri);
- task metric: an evaluator entry point ``module:function(state_dict, task) -> {metric: value}``
  scores the retrieved model and, when the source is at hand, the fine-tuned model,
  whose ratio is the normalized score.

The gate compares each task's normalized score (or, without an evaluator, its delta
cosine) with the bundle's threshold; one task below it rejects the version.

What is measured is what is served: a version with a quantized serving superposition is
validated through it (the same readers `randes materialize` uses by default), so the
gate answers for the models users get, quantization error included.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from randes.checkpoint import CheckpointReader
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.manifest import BundleManifest, TaskEntry
from randes.retrieve import retrieve
from randes.source import TensorSource
from randes.validation_policy import Decision, ValidationPolicy, select, task_states
from storage.cache import integrity_context, version_context
from storage.readers import open_task_source
from storage.workspace import Workspace

Evaluator = Callable[[Mapping[str, torch.Tensor], str], Mapping[str, float]]


class EvaluatorError(RandesError):
    """An evaluator entry point that cannot be imported or returns no metric."""


@dataclass(frozen=True)
class TaskValidation:
    task: str
    delta_cosine: float | None
    delta_rel_error: float | None
    metric: str | None
    value: float | None
    reference: float | None
    normalized: float | None
    served: str = "master"
    """The superposition measured: the serving format's name (int4-g64), or master."""

    @property
    def score(self) -> float | None:
        """What the gate compares: the normalized metric, else the delta cosine."""
        return self.normalized if self.normalized is not None else self.delta_cosine

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ValidationReport:
    bundle: str
    version: int
    threshold: float | None
    tasks: list[TaskValidation]
    problems: list[str] = field(default_factory=list)
    """Broken bundle-level invariants (storage.invariants): any one rejects the version."""
    decisions: list[Decision] = field(default_factory=list)
    """Every task of the version, measured or skipped, and why (`plan`)."""
    policy: ValidationPolicy | None = None
    """The policy the decisions followed (the bundle's, with this run's overrides)."""

    @property
    def passed(self) -> bool:
        if self.problems:
            return False
        if self.threshold is None:
            return True
        return all(t.score is not None and t.score >= self.threshold for t in self.tasks)

    @property
    def failing(self) -> list[str]:
        if self.threshold is None:
            return []
        return [t.task for t in self.tasks if t.score is None or t.score < self.threshold]


def plan(
    ws: Workspace,
    manifest: BundleManifest,
    policy: ValidationPolicy,
    *,
    everything: bool = False,
) -> list[Decision]:
    """Which tasks of ``manifest``'s version to measure: reads JSON and registry rows only.

    Predicted interference comes from the norms the manifests store (the version's and
    its base's), the history from the registry's checks at versions <= this one."""
    base_norms = ws.base_manifest(manifest.base.name).norms
    history = {} if everything else ws.registry.last_checks(manifest.bundle, up_to=manifest.version)
    return select(
        manifest.version,
        task_states(manifest, base_norms),
        history,
        policy,
        everything=everything,
    )


def load_evaluator(spec: str) -> Evaluator:
    """Import ``module:function``; the function scores a state dict on a task."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvaluatorError(f"evaluator {spec!r}: use module:function")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise EvaluatorError(f"evaluator {spec!r} cannot be loaded: {exc}") from None
    if not callable(function):
        raise EvaluatorError(f"evaluator {spec!r} is not callable")
    return function  # type: ignore[no-any-return]


def validate_task(
    ws: Workspace,
    bundle: str,
    version: int,
    task: str,
    *,
    evaluator: Evaluator | None = None,
    scale: float | None = None,
    master: bool = False,
) -> TaskValidation:
    """Retrieve one task of one version and measure it against its source.

    What is measured is what the version serves (its quantized superposition when it has
    one), or its fp32 master with ``master``.

    Reads every object the task's materialized model is made of, each verified by
    sha256 (through the cache, see `storage.cache`): the version's manifest, the base,
    the superposition, the task's private tensors and its side files (config.json).
    A damaged one raises `IntegrityError` naming its key and this bundle version.
    """
    context = version_context(bundle, version)
    with integrity_context(context):
        return _validate_task(
            ws, bundle, version, task, evaluator=evaluator, scale=scale, master=master
        )


def _validate_task(
    ws: Workspace,
    bundle: str,
    version: int,
    task: str,
    *,
    evaluator: Evaluator | None,
    scale: float | None,
    master: bool = False,
) -> TaskValidation:
    _, manifest = ws.resolve(bundle, str(version))
    source = None
    try:
        # open_task also fetches and checks the side files materialize would copy
        with ws.open_task(manifest, task, master=master) as opened:
            entry = opened.entry
            source = _open_source(ws, entry)
            chosen = scale if scale is not None else ws.task_scale(manifest, entry, opened.base)
            stream = retrieve(
                base=opened.base,
                superposition=opened.superposition,
                private=opened.private,
                seed=entry.seed,
                key_map=entry.key_map,
                config=manifest.transform,
                scale=chosen,
            )
            keep = evaluator is not None
            # the source as the task's names see it: wrappers stripped, adapters merged
            view = check_compatible(opened.base, source).source if source is not None else None
            state, cosine, rel_error = _measure(stream, opened.base, view, entry, keep_state=keep)
        metric = value = reference = normalized = None
        if evaluator is not None:
            metric, value = _first_metric(evaluator(state, task), task)
            if view is not None:
                _, reference = _first_metric(
                    evaluator({k: view.get(k) for k in view.keys()}, task),  # noqa: SIM118
                    task,
                )
                normalized = value / reference if reference else None
        served = "master" if master or manifest.serving is None else manifest.serving.scheme.name
        return TaskValidation(
            task, cosine, rel_error, metric, value, reference, normalized, served=served
        )
    finally:
        if source is not None:
            source.close()


def _open_source(ws: Workspace, entry: TaskEntry) -> CheckpointReader | None:
    """The task's source checkpoint when it can be fetched and still has its sha256
    (unreachable, vanished or changed: measured without it)."""
    try:
        return open_task_source(entry, ws.settings)
    except RandesError:
        return None


def _measure(
    stream: Iterator[tuple[str, torch.Tensor]],
    base: CheckpointReader,
    source: TensorSource | None,
    entry: TaskEntry,
    *,
    keep_state: bool,
) -> tuple[dict[str, torch.Tensor], float | None, float | None]:
    """Consume the retrieval stream once: keep tensors if asked, accumulate fidelity."""
    state: dict[str, torch.Tensor] = {}
    dot = ret_sq = src_sq = diff_sq = 0.0
    for name, tensor in stream:
        if keep_state:
            state[name] = tensor
        if source is None or name not in source:
            continue
        base_name = entry.key_map.to_base(name)
        if base_name is None or base_name not in base or not tensor.is_floating_point():
            continue
        base_tensor = base.get(base_name).double()
        got = tensor.double() - base_tensor
        want = source.get(name).double() - base_tensor
        dot += float((got * want).sum())
        ret_sq += float((got * got).sum())
        src_sq += float((want * want).sum())
        diff_sq += float(((got - want) ** 2).sum())
    if source is None or src_sq == 0.0:
        return state, None, None
    cosine = dot / math.sqrt(ret_sq * src_sq) if ret_sq > 0 else 0.0
    return state, cosine, math.sqrt(diff_sq / src_sq)


def _first_metric(result: Mapping[str, float], task: str) -> tuple[str, float]:
    if not result:
        raise EvaluatorError(f"evaluator returned no metric for task {task!r}")
    metric, value = next(iter(result.items()))
    return metric, float(value)


def report_markdown(report: ValidationReport) -> str:
    """The gate's verdict, every measured task with why it was measured, and what was
    skipped and why (what `randes validate` prints and the flow's artifact holds)."""
    if report.passed:
        verdict = "validated"
    elif report.problems:
        verdict = f"rejected (broken invariants: {'; '.join(report.problems)})"
    else:
        verdict = f"rejected (below gate: {', '.join(report.failing)})"
    why = {d.task: f"{d.reason}: {d.detail}" for d in report.decisions}
    skipped = [d for d in report.decisions if not d.measured]
    policy = f" (policy: {_policy_words(report.policy)})" if report.policy is not None else ""
    lines = [
        f"# {report.bundle} version {report.version}: {verdict}",
        "",
        f"Gate threshold: {report.threshold if report.threshold is not None else 'none'}",
        "",
        f"Measured on: {', '.join(sorted({t.served for t in report.tasks})) or 'no tasks'}",
        "",
        *(
            [
                f"Measured {len(report.tasks)} of {len(report.decisions)} tasks"
                + (f"; skipped {len(skipped)}" if skipped else "")
                + policy,
                "",
            ]
            if report.decisions
            else []
        ),
        "| task | why | metric | retrieved | fine-tuned | normalized | delta cosine "
        "| delta rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in report.tasks:
        lines.append(
            f"| {t.task} | {why.get(t.task, '')} | {t.metric or ''} | {_fmt(t.value)} | "
            f"{_fmt(t.reference)} | {_fmt(t.normalized)} | {_fmt(t.delta_cosine)} | "
            f"{_fmt(t.delta_rel_error)} |"
        )
    if skipped:
        lines += ["", f"Skipped ({len(skipped)}):", "", "| task | why not |", "|---|---|"]
        lines += [f"| {d.task} | {d.detail} |" for d in skipped]
    return "\n".join(lines)


def _policy_words(policy: ValidationPolicy) -> str:
    sample = "auto" if policy.sample is None else str(policy.sample)
    return (
        f"new tasks, interference moved > {100 * policy.drift:g}%, rotation every "
        f"{policy.window} versions, sample {sample}"
    )


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"

"""Validation that does not grow with the number of tasks, through the validate flow.

A 32-task bundle of tiny fine-tunes (folded through the Workspace API, one version per
task, as ingestion would) is validated once (every task new), then grows by one task a
version, each version validated by the flow with the default policy:

- each new version costs at most 8 retrievals (counted where they happen: the retrieval
  calls the validate tasks make, and the evaluation rows they leave);
- every task of every validated version was measured within the last 8 versions
  (the registry's checks say when);
- the report, the artifact rows and the registry say which tasks were measured and why,
  and which were skipped.

The `randes` command line then shows and sets the bundle's policy and runs
``validate --all``.

The fine-tunes are tiny BERTs saved by transformers' ``save_pretrained`` over a bare
``BertModel`` base, in turn: a sequence classifier in fp32, one saved in bf16, a token
classifier (no pooler).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flows.validation
from flows.pipeline import ingest_flow, validate_flow
from randes.validation_policy import DEFAULT_WINDOW
from storage.workspace import Workspace
from tests.cli_run import cli
from tests.hf_models import save_base, save_finetune

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_TASKS = 32
BUDGET = 8
SHAPES: list[dict[str, Any]] = [{}, {"dtype": "bfloat16"}, {"task": "BertForTokenClassification"}]


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """The base `new_bundle` registers: a bare BertModel saved by transformers."""
    return save_base(tmp_path / "models" / "base")


def make_finetune(base_dir: Path, directory: Path, seed: int) -> Path:
    """Fine-tune ``seed`` of the base, in the shape ``seed`` picks from `SHAPES`."""
    return save_finetune(base_dir, directory, seed, **SHAPES[seed % len(SHAPES)])


class Retrievals:
    """Counts the retrievals the validate tasks make (they run in worker threads)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def wrap(self, retrieve: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self._lock:
                self.count += 1
            return retrieve(*args, **kwargs)

        return counted

    def take(self) -> int:
        with self._lock:
            n, self.count = self.count, 0
            return n


@pytest.fixture
def retrievals(monkeypatch: pytest.MonkeyPatch) -> Retrievals:
    counter = Retrievals()
    monkeypatch.setattr(flows.validation, "retrieve", counter.wrap(flows.validation.retrieve))
    return counter


def _artifacts(flow_run_id: Any) -> tuple[list[dict[str, Any]], str]:
    """The validate run's table rows and markdown summary, as the Prefect API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    table = next(a for a in artifacts if a.type == "table")
    markdown = next(a for a in artifacts if a.type == "markdown")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    return list(data), str(markdown.data)


def _fold(ws: Workspace, base_dir: Path, tmp_path: Path, index: int) -> int:
    source = make_finetune(base_dir, tmp_path / "tuned" / f"t{index:02d}", index)
    return ws.fold("wide", str(source), f"t{index:02d}").version


def test_a_32_task_bundle_validates_within_budget_and_window(
    new_bundle: Callable[..., None],
    base_dir: Path,
    tmp_path: Path,
    retrievals: Retrievals,
) -> None:
    new_bundle("wide")
    with Workspace.open() as ws:
        for i in range(N_TASKS - 1):
            _fold(ws, base_dir, tmp_path, i)

    first = validate_flow("wide", N_TASKS - 1)
    assert first.passed and retrievals.take() == N_TASKS - 1
    assert {d.reason for d in first.decisions} == {"new"}  # never validated: all new

    versions = range(N_TASKS, N_TASKS + DEFAULT_WINDOW + 1)  # 32 tasks, then 33, ... 40
    for version in versions:
        with Workspace.open() as ws:
            assert _fold(ws, base_dir, tmp_path, version - 1) == version
        report = validate_flow("wide", version)
        cost = retrievals.take()
        measured = [d for d in report.decisions if d.measured]
        assert report.passed
        assert cost == len(measured) == len(report.tasks) <= BUDGET, (version, cost)
        reasons = {d.task: d.reason for d in measured}
        assert reasons.pop(f"t{version - 1:02d}") == "new"
        assert set(reasons.values()) == {"rotation"}, reasons
        with Workspace.open() as ws:
            cosines = [
                e for e in ws.registry.evaluations("wide", version) if e.metric == "delta_cosine"
            ]
            assert len(cosines) == cost  # one evaluation row per retrieval, no more
            checks = ws.registry.validation_checks("wide", version)
            assert len(checks) == version  # one row per task, measured or skipped
            assert sum(c.measured for c in checks) == cost
    assert first.decisions and len(report.decisions) == N_TASKS + DEFAULT_WINDOW

    # The window: in every validated version, every task's latest measurement (at or
    # before it) is less than DEFAULT_WINDOW versions old.
    with Workspace.open() as ws:
        for version in versions:
            last = ws.registry.last_checks("wide", up_to=version)
            ages = {t.name: version - last[t.name].version for t in ws.registry.tasks(
                "wide", version=version
            )}  # fmt: skip
            assert max(ages.values()) < DEFAULT_WINDOW, (version, ages)
        # and the 31 tasks first measured at version 31 were all measured again since
        last = ws.registry.last_checks("wide", up_to=versions[-1])
        assert min(c.version for c in last.values()) > N_TASKS - 1

    # What the report says: why each task was measured, and why the others were not.
    text = flows.validation.report_markdown(report)
    assert f"Measured {len(report.tasks)} of {N_TASKS + DEFAULT_WINDOW} tasks" in text
    assert f"| t{versions[-1] - 1:02d} | new: added in version {versions[-1]} |" in text
    assert "rotation: last validated at version" in text
    skipped = next(d for d in report.decisions if not d.measured)
    assert f"| {skipped.task} | last validated at version {skipped.last_version}; " in text
    assert "interference moved by" in skipped.detail and "threshold 25.0%" in skipped.detail


def test_ingest_measures_the_new_checkpoints_and_says_what_it_skipped(
    new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path, retrievals: Retrievals
) -> None:
    """Every checkpoint an ingest folds is new, so measured, even when the run folds
    several (only the head is validated); the older tasks rotate.

    Two tasks joining six raise the others' r_t by ~2/5: a drift of 0.6 lets them rotate
    (at the default 0.25 all six would be measured for it, as the gate test shows)."""
    new_bundle("inc")
    with Workspace.open() as ws:
        ws.registry.set_validation_policy("inc", window=4, drift=0.6)
        for i in range(6):
            source = make_finetune(base_dir, tmp_path / "old" / f"o{i}", i)
            ws.fold("inc", str(source), f"o{i}")
    assert validate_flow("inc", 6).passed and retrievals.take() == 6
    incoming = tmp_path / "incoming"
    for i in range(2):
        make_finetune(base_dir, incoming / f"n{i}", 50 + i)

    summary = ingest_flow("inc", str(incoming))
    assert summary["version"] == 7 and summary["status"] == "validated"  # one batch
    validation = summary["validation"]["inc"]
    # 2 new + ceil(6 / 4) = 2 rotated; the 4 others skipped
    assert validation["version"] == 7 and len(validation["measured"]) == 4
    assert {"n0", "n1"} <= set(validation["measured"]) and len(validation["skipped"]) == 4
    assert retrievals.take() == 4

    everything = ingest_flow("inc", str(incoming), validate_all=True)  # nothing new: no run
    assert everything["validation"] == {}
    forced = validate_flow("inc", 7, everything=True)
    assert retrievals.take() == 8 and {d.reason for d in forced.decisions} == {"all"}
    assert "all: all requested" in flows.validation.report_markdown(forced)

    # The run's artifacts: a row per task (measured or skipped, and why), the summary.
    state = validate_flow("inc", 7, return_state=True)
    rows, summary_md = _artifacts(state.state_details.flow_run_id)
    assert len(rows) == 8 and sum(r["measured"] for r in rows) == 2  # ceil(8 / 4) rotated
    assert {r["reason"] for r in rows} == {"rotation", "skipped"}
    assert all(r["why"].startswith("last validated at version 7") for r in rows)
    assert all(r["delta_cosine"] is not None for r in rows if r["measured"])
    assert all(r["delta_cosine"] is None for r in rows if not r["measured"])
    assert "Measured 2 of 8 tasks; skipped 6" in summary_md and "Skipped (6):" in summary_md


def test_validate_command_options_and_the_bundle_policy(
    new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    new_bundle("cli")
    with Workspace.open() as ws:
        for i in range(5):
            ws.fold("cli", str(make_finetune(base_dir, tmp_path / f"c{i}", i)), f"c{i}")

    shown = cli("bundle", "validation", "cli")
    assert shown.code == 0, shown
    assert "more than 25%" in shown.out and "every 8 versions" in " ".join(shown.out.split())
    changed = cli("bundle", "validation", "cli", "--window", "2", "--sample", "1")
    assert changed.code == 0 and "every 2 versions" in " ".join(changed.out.split()), changed
    bad = cli("bundle", "validation", "cli", "--window", "0")
    assert bad.code == 2, bad

    first = cli("validate", "cli")
    assert first.code == 0, first
    assert "Measured 5 of 5 tasks" in first.out and "new: added in version 1" in first.out
    again = cli("validate", "cli")  # the same version: only the rotation (sample 1)
    text = " ".join(again.out.split())
    assert again.code == 0 and "Measured 1 of 5 tasks; skipped 4" in text, again
    assert "Skipped (4):" in again.out
    every = cli("validate", "cli", "--all")
    assert every.code == 0 and "Measured 5 of 5 tasks" in every.out, every
    assert "all: all requested" in every.out
    override = cli("validate", "cli", "--sample", "3")  # a run's option beats the bundle's
    assert "Measured 3 of 5 tasks" in " ".join(override.out.split()), override
    refused = cli("validate", "cli", "--drift", "-1")
    assert refused.code == 2, refused

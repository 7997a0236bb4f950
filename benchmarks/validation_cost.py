"""Validation cost by version under the validation policy: retrievals, not seconds.

    .venv/bin/python -m benchmarks.validation_cost                  # 31 tasks, then 16 more
    .venv/bin/python -m benchmarks.validation_cost --tasks 31 --versions 16

Same as ``python -m benchmarks run validation_cost``: writes
benchmarks/results/validation_cost.json and prints the page.

Question answered (issue 15, Must-show 4): what does the validate flow cost per new
version of a 32-task bundle with the default policy (randes.validation_policy), and is
every task measured within the window?

Method: tiny GPT-2-shaped fine-tunes (tests/factories, ~2% deltas) folded through the
Workspace API into an embedded (SQLite + local store) workspace in a temporary home, one
version per task; the validate flow (a temporary Prefect server) validates version
``--tasks`` (every task new), then each later version after one more task is folded. A
retrieval is counted where it happens: every call of `flows.validation.retrieve` (the
validate tasks run in threads of this process). The window is read back from the
registry's checks: in each validated version, the age of each task's latest measurement.
The cost is a count, so the machine's load does not change it.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.runner import entry
from benchmarks.suite import BaseSuite, Context, Page, Result


class ValidationCostSuite(BaseSuite):
    name = "validation_cost"
    title = "Validation cost by version (default policy)"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--tasks", type=int, default=31, help="tasks before the first count")
        ap.add_argument("--versions", type=int, default=16, help="versions to add after it")

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        if quick:
            return {"tasks": min(args.tasks, 9), "versions": min(args.versions, 3)}
        return {"tasks": args.tasks, "versions": args.versions}

    def run(self, ctx: Context) -> dict[str, Any]:
        return measure(ctx, int(ctx.params["tasks"]), int(ctx.params["versions"]))

    def render(self, result: Result) -> Page:
        d = result.data
        lines = [
            f"Default policy: drift {d['drift']}, window {d['window']}, sample auto.",
            "",
            "| version | tasks | retrievals | new | rotation | interference | skipped |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['version']} | {r['tasks']} | {r['retrievals']} | {r['new']} | "
                f"{r['rotation']} | {r['interference']} | {r['skipped']} |"
                for r in d["rows"]
            ),
            "",
            f"Oldest measurement in any validated version after the first: {d['oldest']} versions.",
        ]
        return Page(self.title, "\n".join(lines))


def measure(ctx: Context, n_tasks: int, n_versions: int) -> dict[str, Any]:
    saved_env = dict(os.environ)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["RANDES_HOME"] = str(ctx.work / "home")
    for name in [n for n in os.environ if n.startswith("RANDES_") and n != "RANDES_HOME"]:
        del os.environ[name]  # the embedded default, whatever the caller's environment

    from prefect.testing.utilities import prefect_test_harness

    import flows.validation
    from flows.pipeline import validate_flow
    from randes.config import TransformConfig
    from randes.validation_policy import ValidationPolicy
    from storage.workspace import Workspace
    from tests.factories import make_base, make_finetune

    retrievals = _Counter()
    original = flows.validation.retrieve
    flows.validation.retrieve = retrievals.wrap(original)  # type: ignore[assignment]
    base = make_base(ctx.work / "base")

    def fold(index: int) -> None:
        source = make_finetune(base, ctx.work / "tuned" / f"t{index:02d}", index)
        with Workspace.open() as ws:
            ws.fold("wide", str(source), f"t{index:02d}")

    rows: list[dict[str, Any]] = []
    try:
        with prefect_test_harness(server_startup_timeout=180):
            with Workspace.open() as ws:
                ws.init()
                ws.add_base("tiny", str(base))
                ws.create_bundle("wide", "tiny", TransformConfig())
            for i in range(n_tasks):
                fold(i)
            first = n_tasks
            for version in range(first, first + n_versions + 1):
                if version > first:
                    fold(version - 1)
                report = validate_flow("wide", version)
                reasons = Counter(d.reason for d in report.decisions)
                rows.append(
                    {
                        "version": version,
                        "tasks": len(report.decisions),
                        "retrievals": retrievals.take(),
                        **{k: reasons[k] for k in ("new", "rotation", "interference", "skipped")},
                    }
                )
                ctx.log(f"version {version}: {rows[-1]['retrievals']} retrievals")
            with Workspace.open() as ws:
                ages = []
                for version in range(first + 1, first + n_versions + 1):
                    last = ws.registry.last_checks("wide", up_to=version)
                    tasks = ws.registry.tasks("wide", version=version)
                    ages.append(max(version - last[t.name].version for t in tasks))
    finally:
        flows.validation.retrieve = original  # type: ignore[assignment]
        os.environ.clear()
        os.environ.update(saved_env)
    policy = ValidationPolicy()
    return {
        "drift": policy.drift,
        "window": policy.window,
        "rows": rows,
        "oldest": max(ages) if ages else 0,
    }


class _Counter:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def wrap(self, function: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with self._lock:
                self.count += 1
            return function(*args, **kwargs)

        return counted

    def take(self) -> int:
        with self._lock:
            n, self.count = self.count, 0
            return n


def main() -> int:
    return entry("validation_cost")


if __name__ == "__main__":
    raise SystemExit(main())

"""Validation cost by version under the validation policy: retrievals, not seconds.

    .venv/bin/python -m benchmarks.validation_cost                  # 31 tasks, then 16 more
    .venv/bin/python -m benchmarks.validation_cost --tasks 31 --versions 16

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
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=31, help="tasks before the first count")
    parser.add_argument("--versions", type=int, default=16, help="versions to add after it")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    tmp = Path(tempfile.mkdtemp(prefix="randes-validation-cost-"))
    os.environ["RANDES_HOME"] = str(tmp / "home")
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
    flows.validation.retrieve = retrievals.wrap(flows.validation.retrieve)  # type: ignore[assignment]
    base = make_base(tmp / "base")

    def fold(index: int) -> None:
        source = make_finetune(base, tmp / "tuned" / f"t{index:02d}", index)
        with Workspace.open() as ws:
            ws.fold("wide", str(source), f"t{index:02d}")

    rows = []
    with prefect_test_harness(server_startup_timeout=180):
        with Workspace.open() as ws:
            ws.init()
            ws.add_base("tiny", str(base))
            ws.create_bundle("wide", "tiny", TransformConfig())
        for i in range(args.tasks):
            fold(i)
        first = args.tasks
        for version in range(first, first + args.versions + 1):
            if version > first:
                fold(version - 1)
            report = validate_flow("wide", version)
            reasons = Counter(d.reason for d in report.decisions)
            rows.append((version, len(report.decisions), retrievals.take(), reasons))
        with Workspace.open() as ws:
            ages = []
            for version in range(first + 1, first + args.versions + 1):
                last = ws.registry.last_checks("wide", up_to=version)
                tasks = ws.registry.tasks("wide", version=version)
                ages.append(max(version - last[t.name].version for t in tasks))
    policy = ValidationPolicy()
    print(f"default policy: drift {policy.drift}, window {policy.window}, sample auto")
    print("| version | tasks | retrievals | new | rotation | interference | skipped |")
    print("|---|---|---|---|---|---|---|")
    for version, n, cost, reasons in rows:
        print(
            f"| {version} | {n} | {cost} | {reasons['new']} | {reasons['rotation']} | "
            f"{reasons['interference']} | {reasons['skipped']} |"
        )
    print(f"oldest measurement in any validated version after the first: {max(ages)} versions")


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


if __name__ == "__main__":
    main()

"""Time to the first useful answer, as a new user meets it (the embedded default).

Measures, each in a fresh process of the installed `randes` console script:
- `randes --help` and `randes tasks` (registry queries: no torch, no Prefect), median of N;
- `randes ingest` of one small checkpoint with a brand-new PREFECT_HOME (cold: Prefect's
  temporary server creates and migrates its database) and again with that home (warm).

    .venv/bin/python -m benchmarks.first_run [--repeats 5]

Same as ``python -m benchmarks run first_run``: writes benchmarks/results/first_run.json
and prints the page (``python -m benchmarks report`` renders it into docs/benchmarks/generated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.runner import entry
from benchmarks.suite import BaseSuite, Context, Page, Result
from randes.config import TransformConfig
from storage.settings import Settings
from storage.workspace import Workspace
from tests.factories import make_base, make_finetune

RANDES = str(Path(sys.executable).with_name("randes"))


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([RANDES, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


class FirstRunSuite(BaseSuite):
    name = "first_run"
    title = "First run"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--repeats", type=int, default=5)

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        return {"repeats": 2 if quick and args.repeats == 5 else args.repeats}

    def run(self, ctx: Context) -> dict[str, Any]:
        repeats = int(ctx.params["repeats"])
        root = ctx.work
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANDES_", "PREFECT_"))}
        env.update(
            RANDES_HOME=str(root / "home"),
            PREFECT_HOME=str(root / "prefect"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        base = make_base(root / "models" / "base")
        for seed in (1, 2):
            make_finetune(base, root / f"incoming-{seed}" / f"task{seed}", seed)
        with Workspace(Settings(home=root / "home")) as ws:
            ws.init()
            ws.add_base("b", str(base))
            ws.create_bundle("first", "b", TransformConfig())
        data: dict[str, Any] = {}
        for argv, label in ((["--help"], "randes --help"), (["tasks"], "randes tasks")):
            data[label] = [timed(argv, env) for _ in range(repeats)]
            ctx.log(f"{label}: {statistics.median(data[label]):.2f}s")
        data["ingest cold"] = timed(
            ["ingest", "first", str(root / "incoming-1"), "--no-validate"], env
        )
        data["ingest warm"] = timed(
            ["ingest", "first", str(root / "incoming-2"), "--no-validate"], env
        )
        return data

    def render(self, result: Result) -> Page:
        d = result.data
        rows = [
            (label, f"{statistics.median(d[label]):.2f} s (median of {len(d[label])})")
            for label in ("randes --help", "randes tasks")
        ]
        rows.append(
            (
                "randes ingest, one checkpoint, empty PREFECT_HOME (cold)",
                f"{d['ingest cold']:.1f} s",
            )
        )
        rows.append(
            ("randes ingest, one checkpoint, same PREFECT_HOME (warm)", f"{d['ingest warm']:.1f} s")
        )
        lines = ["| what | wall time |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
        return Page(self.title, "\n".join(lines))


def main() -> int:
    return entry("first_run")


if __name__ == "__main__":
    raise SystemExit(main())

"""Time to the first useful answer, as a new user meets it (the embedded default).

Measures, each in a fresh process of the installed `randes` console script:
- `randes --help` and `randes tasks` (registry queries: no torch, no Prefect), median of N;
- `randes ingest` of one small checkpoint with a brand-new PREFECT_HOME (cold: Prefect's
  temporary server creates and migrates its database) and again with that home (warm).

    .venv/bin/python -m benchmarks.first_run [--repeats 5]

Prints a markdown table; the figures in docs/benchmarks.md ("First run") come from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from randes.config import TransformConfig
from storage.workspace import Workspace
from tests.factories import make_base, make_finetune

RANDES = str(Path(sys.executable).with_name("randes"))


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([RANDES, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANDES_", "PREFECT_"))}
        env.update(
            RANDES_HOME=str(root / "home"),
            PREFECT_HOME=str(root / "prefect"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
        )
        os.environ.update({k: env[k] for k in ("RANDES_HOME",)})
        base = make_base(root / "models" / "base")
        for seed in (1, 2):
            make_finetune(base, root / f"incoming-{seed}" / f"task{seed}", seed)
        with Workspace.open() as ws:
            ws.init()
            ws.add_base("b", str(base))
            ws.create_bundle("first", "b", TransformConfig())
        rows: list[tuple[str, str]] = []
        for argv, label in ((["--help"], "randes --help"), (["tasks"], "randes tasks")):
            times = [timed(argv, env) for _ in range(args.repeats)]
            rows.append((label, f"{statistics.median(times):.2f} s (median of {args.repeats})"))
        cold = timed(["ingest", "first", str(root / "incoming-1"), "--no-validate"], env)
        warm = timed(["ingest", "first", str(root / "incoming-2"), "--no-validate"], env)
        rows.append(("randes ingest, one checkpoint, empty PREFECT_HOME (cold)", f"{cold:.1f} s"))
        rows.append(("randes ingest, one checkpoint, same PREFECT_HOME (warm)", f"{warm:.1f} s"))
    load = os.getloadavg()[0]
    print(
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average {load:.1f}."
    )
    print("\n| what | wall time |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()

"""``python -m benchmarks run SUITE [--quick] [options]``: measure and write a result file.

The result lands in ``benchmarks/results/<key>.json`` (``--quick``:
``benchmarks/results/quick/``, not committed: tiny sizes check that a suite runs, they
measure nothing worth quoting), with the machine, versions, commit, UTC date and the exact
command of the run. ``python -m benchmarks report`` turns result files into pages.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import machine, registry
from benchmarks.report import RESULTS, render_markdown
from benchmarks.suite import Context, Result, RunMeta


def results_dir(quick: bool) -> Path:
    return RESULTS / "quick" if quick else RESULTS


def command_line(argv: Sequence[str]) -> str:
    """The command as a user would type it again, from the repository root."""
    return ".venv/bin/python -m " + shlex.join(["benchmarks", *argv])


def run_suite(name: str, argv: Sequence[str], command: str | None = None) -> tuple[Result, Path]:
    """Parse the suite's options from ``argv``, measure, write the result file."""
    suite = registry.get(name)
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks run {name}", description=suite.title)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs")
    ap.add_argument("--results", type=Path, default=None, help="folder for the result file")
    ap.add_argument("--tmp", type=Path, default=None, help="parent of the scratch directory")
    suite.add_arguments(ap)
    args = ap.parse_args(list(argv))
    params = suite.params(args, args.quick)
    out_dir = args.results or results_dir(args.quick)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {name}: {msg}", file=sys.stderr, flush=True)

    date = machine.utc_now()
    commit, dirty = machine.git_state()
    work = Path(tempfile.mkdtemp(prefix=f"randes-bench-{name}-", dir=args.tmp))
    try:
        data = suite.run(Context(args=args, quick=args.quick, work=work, log=log, params=params))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = RunMeta(
        date=date,
        command=command or command_line(["run", name, *argv]),
        git_commit=commit,
        git_dirty=dirty,
        machine=machine.machine_facts(),
        versions=machine.versions(),
        wall_s=round(time.perf_counter() - t0, 1),
        load_start=round(load0, 2),
        load_end=round(os.getloadavg()[0], 2),
    )
    result = Result(
        suite=name, key=suite.key(params), quick=args.quick, params=params, data=data, meta=meta
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result.key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a result behind
    log(f"wrote {path} in {meta.wall_s:.0f}s")
    return result, path


def entry(name: str, argv: Sequence[str] | None = None) -> int:
    """A suite's own ``python -m benchmarks.<module>``: run it, print its page."""
    args = list(sys.argv[1:] if argv is None else argv)
    module = sys.modules["__main__"].__spec__
    shown = module.name if module is not None else f"benchmarks.{name}"
    result, _ = run_suite(name, args, command=".venv/bin/python -m " + shlex.join([shown, *args]))
    print(render_markdown(result, registry.get(name).render(result)))
    return 0

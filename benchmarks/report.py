"""``python -m benchmarks report``: result files -> markdown pages (and PNG figures).

Reads ``benchmarks/results/*.json`` (or ``--results``), renders each with its suite's
``render`` under a header made from the result's ``RunMeta``, and writes
``docs/benchmarks/generated/<key>.md``, figures under ``img/`` and an ``index.md``.
Only the generated folder is written: the hand-written docs/benchmarks.md links to it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from benchmarks import machine, registry
from benchmarks.suite import Page, Result

RESULTS = machine.ROOT / "benchmarks" / "results"
"""Result files of full runs (committed); ``--quick`` ones go to ``RESULTS / "quick"``."""
GENERATED = machine.ROOT / "docs" / "benchmarks" / "generated"


def header(result: Result) -> str:
    m = result.meta
    when = utc_text(m.date)
    dirty = " (with uncommitted changes)" if m.git_dirty else ""
    quick = (
        "\n\n**Quick mode**: tiny sizes that check the suite runs; not a measurement."
        if result.quick
        else ""
    )
    return (
        f"Measured {when} UTC on {machine.describe(m.machine, m.versions)}, commit "
        f"`{m.git_commit[:12]}`{dirty}; {m.wall_s:.0f} s wall, load average "
        f"{m.load_start:.1f} at the start and {m.load_end:.1f} at the end. Command:\n\n"
        f"```\n{m.command}\n```{quick}"
    )


def utc_text(date: str) -> str:
    """'2026-12-01T11:05:17+00:00' -> '2026-12-01 11:05:17' (the page says UTC)."""
    return date.replace("T", " ").removesuffix("+00:00")


def render_markdown(result: Result, page: Page) -> str:
    return f"# {page.title}\n\n{header(result)}\n\n{page.markdown.strip()}\n"


def load(path: Path) -> Result:
    return Result.from_json(json.loads(path.read_text()))


def render_all(results: Path, out: Path) -> list[Path]:
    """Render every result file under ``results`` (not recursive) into ``out``."""
    written: list[Path] = []
    index = ["# Generated benchmark results", ""]
    index.append(f"Rendered by `python -m benchmarks report` from `{_rel(results)}`.")
    index.append("")
    files = sorted(results.glob("*.json"))
    if not files:
        index.append("No result files yet: `python -m benchmarks run SUITE` writes them.")
    for path in files:
        result = load(path)
        page = registry.get(result.suite).render(result)
        img = out / "img"
        for name, draw in page.figures.items():
            img.mkdir(parents=True, exist_ok=True)
            draw(img / name)
            written.append(img / name)
        target = out / f"{result.key}.md"
        out.mkdir(parents=True, exist_ok=True)
        target.write_text(render_markdown(result, page))
        written.append(target)
        index.append(f"- [{page.title}]({target.name}): {utc_text(result.meta.date)} UTC")
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.md").write_text("\n".join(index) + "\n")
    written.append(out / "index.md")
    return written


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(machine.ROOT))
    except ValueError:
        return str(p)


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    ap.add_argument("--out", type=Path, default=GENERATED, help="folder the pages go to")
    args = ap.parse_args(list(argv))
    for p in render_all(args.results, args.out):
        print(_rel(p))
    return 0

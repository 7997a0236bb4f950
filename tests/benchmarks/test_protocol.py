"""The benchmark runner and report step, end to end on a toy suite, and the suite rules.

The toy suite measures something real but instant (sorting a list), so the test checks
what the runner and report add: a result file with the run's facts, a page rendered from
that file alone, its figure drawn, nothing written outside the given folders.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks import registry
from benchmarks.report import render_all
from benchmarks.runner import run_suite
from benchmarks.suite import BaseSuite, Context, Page, Result, Suite

ROOT = Path(__file__).resolve().parents[2]


class ToySuite(BaseSuite):
    name = "toy"
    title = "Toy: sorting"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--size", type=int, default=10_000)

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        return {"size": 100 if quick else args.size}

    def key(self, params: Mapping[str, Any]) -> str:
        return f"toy-{params['size']}"

    def run(self, ctx: Context) -> dict[str, Any]:
        xs = list(range(ctx.params["size"], 0, -1))
        t0 = time.perf_counter()
        ys = sorted(xs)
        (ctx.work / "scratch").write_text("x")  # the scratch dir exists during the run
        return {"seconds": time.perf_counter() - t0, "first": ys[0], "work": str(ctx.work)}

    def render(self, result: Result) -> Page:
        def draw(path: Path) -> None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.bar(["sort"], [result.data["seconds"]])
            fig.savefig(path)
            plt.close(fig)

        body = f"sorted {result.params['size']} items, first {result.data['first']}\n\n"
        return Page(self.title, body + "![bar](img/toy.png)", {"toy.png": draw})


def test_run_writes_a_result_with_its_facts_and_report_renders_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.SUITES, "toy", f"{__name__}:ToySuite")
    results = tmp_path / "results"
    result, path = run_suite("toy", ["--size", "500", "--results", str(results)])
    assert path == results / "toy-500.json"
    raw = json.loads(path.read_text())
    assert raw["suite"] == "toy" and raw["params"] == {"size": 500} and not raw["quick"]
    meta = raw["meta"]
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
    assert datetime.fromisoformat(meta["date"]).utcoffset() is not None
    assert meta["command"].endswith("benchmarks run toy --size 500 --results " + str(results))
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["memory_bytes"] > 0
    assert "torch" in meta["versions"]
    assert not Path(raw["data"]["work"]).exists()  # scratch removed after the run
    assert Result.from_json(raw) == result

    pages = tmp_path / "pages"
    written = render_all(results, pages)
    page = (pages / "toy-500.md").read_text()
    assert page.startswith("# Toy: sorting\n")
    assert meta["git_commit"][:12] in page and meta["command"] in page
    assert "sorted 500 items, first 1" in page
    assert (pages / "img" / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert "[Toy: sorting](toy-500.md)" in (pages / "index.md").read_text()
    assert set(written) == {pages / "toy-500.md", pages / "img" / "toy.png", pages / "index.md"}


def test_quick_results_are_kept_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.SUITES, "toy", f"{__name__}:ToySuite")
    result, path = run_suite("toy", ["--quick", "--results", str(tmp_path)])
    assert result.quick and path.name == "toy-100.json"
    render_all(tmp_path, tmp_path / "pages")
    assert "Quick mode" in (tmp_path / "pages" / "toy-100.md").read_text()


def test_a_result_of_another_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schema"):
        Result.from_json({"schema": 0, "meta": {}})


@pytest.mark.parametrize("name", sorted(registry.SUITES))
def test_every_registered_suite_meets_the_protocol(name: str) -> None:
    """Imported for real: a suite whose module fails to import fails here, not in `make bench`."""
    pytest.importorskip("torch")
    suite = registry.get(name)
    assert isinstance(suite, Suite) and suite.name == name and suite.title


"""Rewritten in another change (issue 14's S3 item): held to the rules once it lands."""


def _benchmark_modules() -> dict[str, Path]:
    return {
        f"benchmarks.{p.stem}": p
        for p in sorted((ROOT / "benchmarks").glob("*.py"))
        if p.stem != "__init__"
    }


def test_benchmark_modules_are_small_and_import_without_a_loop() -> None:
    mods = _benchmark_modules()
    long = {m: n for m, p in mods.items() if (n := len(p.read_text().splitlines())) >= 500}
    assert not long, f"modules of 500 lines or more: {long}"
    deps: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        text = path.read_text()
        assert "sys.path" not in text, f"{mod} edits sys.path"
        found = set()
        for node in ast.walk(tree):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "benchmarks":
                    found |= {f"benchmarks.{a.name}" for a in node.names}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        deps[mod] = {d for d in found if d in mods and d != mod}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(deps[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(deps[m])
        return seen

    loops = sorted(m for m in mods if m in reach(m))
    assert not loops, f"import loops through {loops}"

"""The serving runtime suite (see benchmarks.runtime), built from parts.

Each ``Part`` measures one question on the pulled bundles and stores its data under its
name; the four questions of issue 13 render together (``runtime_report.report``, whose
verdicts read across them), a subset renders part by part. A new measurement (a batched
fold, a task switch on another device) is one more ``Part`` in ``PARTS`` with its own
``render``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import runtime_measure as m
from benchmarks.cost_models import GPT2_SMALL, QUICK, ModelSpec
from benchmarks.runtime_build import build
from benchmarks.runtime_report import memory_table, memory_verdict, report
from benchmarks.suite import BaseSuite, Context, Page, Result


@dataclass(frozen=True)
class RuntimeRun:
    """What every part is given: the bundles pulled per task count, tasks, repeats."""

    pulled: dict[int, Path]
    n: int  # the task count most parts serve
    tasks: list[str]
    repeats: int
    work: Path
    log: Callable[[str], None]


@dataclass(frozen=True)
class Part:
    name: str
    measure: Callable[[RuntimeRun], Any]
    render: Callable[[Any], list[str]] | None = None  # None: rendered by runtime_report


def _memory_lines(mem: Any) -> list[str]:
    return [memory_verdict(mem), "", *memory_table(mem)]


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("correct_tiny", lambda r: m.correctness_tiny(r.work / "tiny")),
        Part("correct_large", lambda r: m.correctness_large(r.pulled[r.n], r.work, r.tasks)),
        Part("switch", lambda r: m.switch_times(r.pulled[r.n], r.work, r.tasks, r.repeats)),
        Part("memory", lambda r: m.memory(r.pulled, r.work, max(1, r.repeats // 2)), _memory_lines),
        Part("mixed", lambda r: m.mixed_throughput(r.pulled[r.n], r.tasks, max(2, r.repeats - 2))),
    )
}
CORE = ("correct_tiny", "correct_large", "switch", "memory", "mixed")


def evict_from_page_cache(roots: Iterable[Path]) -> int:
    """Drop every file under ``roots`` from the page cache (``POSIX_FADV_DONTNEED``;
    pages mapped by a live process stay). Returns the bytes advised."""
    total = 0
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    total += os.fstat(fd).st_size
                finally:
                    os.close(fd)
    return total


class RuntimeSuite(BaseSuite):
    name = "runtime"
    title = "Serving runtime"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--root", default=None, help="where bundles are built and kept")
        ap.add_argument("--versions", default="1,8", help="task counts served (pulled versions)")
        ap.add_argument("--repeats", type=int, default=5)
        ap.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
        ap.add_argument(
            "--evict",
            action="store_true",
            help="drop the pulled files from the page cache first: the runtime reads them "
            "back itself, the state a server meets after the kernel reclaimed them",
        )

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        parts = [p for p in args.parts.split(",") if p]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SystemExit(f"error: unknown runtime part(s) {unknown}; known: {list(PARTS)}")
        versions = sorted(int(v) for v in args.versions.split(","))
        repeats = 2 if quick and args.repeats == 5 else args.repeats
        spec = QUICK[0] if quick else GPT2_SMALL
        return {
            "spec": asdict(spec),
            "versions": versions,
            "repeats": repeats,
            "parts": parts,
            "evict": bool(args.evict),
        }

    def key(self, params: Mapping[str, Any]) -> str:
        parts = list(params["parts"])
        key = self.name if parts == list(PARTS) else f"{self.name}-{'-'.join(parts)}"
        return f"{key}-evicted" if params.get("evict") else key

    def run(self, ctx: Context) -> dict[str, Any]:
        import torch

        torch.set_num_threads(1)
        p = ctx.params
        spec = ModelSpec(**p["spec"])
        # kept between runs of the same shape (building the 124M bundle takes minutes)
        root = Path(ctx.args.root or Path(tempfile.gettempdir()) / f"randes-runtime-{spec.name}")
        pulled = build(spec, root, list(p["versions"]), ctx.log)
        n = 8 if 8 in pulled else max(pulled)
        if p.get("evict"):
            evicted = evict_from_page_cache(pulled.values())
            ctx.log(f"evicted {evicted >> 20} MiB from the page cache")
        run = RuntimeRun(
            pulled=pulled,
            n=n,
            tasks=[f"t{k}" for k in range(1, n + 1)],
            repeats=p["repeats"],
            work=ctx.work / "scratch",
            log=ctx.log,
        )
        run.work.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {"tasks": run.tasks}
        for name in p["parts"]:
            ctx.log(name)
            data[name] = PARTS[name].measure(run)
        return data

    def render(self, result: Result) -> Page:
        spec = ModelSpec(**result.params["spec"])
        data = result.data
        lines: list[str] = []
        if result.params.get("evict"):
            lines += [
                "Page cache: every pulled file was evicted before the run (`--evict`), so the"
                " runtime read them back itself: the state after the kernel reclaimed them.",
                "",
            ]
        if all(c in data for c in CORE):
            lines.append(report(dict(data), spec))
        for name in result.params["parts"]:
            part = PARTS.get(name)
            if name in data and part is not None and part.render is not None:
                if name in CORE and all(c in data for c in CORE):
                    continue
                lines += [*part.render(data[name]), ""]
        return Page(self.title, "\n".join(lines))

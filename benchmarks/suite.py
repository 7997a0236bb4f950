"""The benchmark suite protocol: what a suite is, what it is given, what it returns.

A suite measures (``run``) and renders (``render``) in two separate steps joined by a
JSON file, so a report can be redrawn, or its wording changed, without rerunning hours of
measurements, and no script ever edits the hand-written docs. The runner
(``benchmarks.runner``) wraps every result in a ``Result`` that records where, when and
how it was measured (``RunMeta``); the report step (``benchmarks.report``) renders it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

SCHEMA = 1
"""Version of the result file layout (bumped when ``Result``'s fields change)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunMeta:
    """Where, when and how a result was measured: rendered above every generated page."""

    date: str  # UTC, ISO 8601, seconds
    command: str  # the exact command line that produced the result
    git_commit: str
    git_dirty: bool
    machine: dict[str, Any]  # platform / psutil facts, see benchmarks.machine
    versions: dict[str, str]  # package -> installed version
    wall_s: float
    load_start: float
    load_end: float


@dataclass(frozen=True)
class Result:
    """One run of one suite: its parameters, its measured data and its ``RunMeta``."""

    suite: str
    key: str  # file stem under benchmarks/results/: the suite name plus what varies
    quick: bool
    params: dict[str, Any]
    data: dict[str, Any]
    meta: RunMeta
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Result:
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"result schema {raw.get('schema')!r}, expected {SCHEMA}")
        fields = {k: v for k, v in raw.items() if k != "meta"}
        return cls(**fields, meta=RunMeta(**raw["meta"]))


@dataclass
class Context:
    """What a suite's ``run`` gets: its options, a scratch directory and a logger."""

    args: argparse.Namespace
    quick: bool
    work: Path  # scratch directory, removed after the run
    log: Log
    params: dict[str, Any] = field(default_factory=dict)  # filled by Suite.params


@dataclass(frozen=True)
class Page:
    """A rendered result: markdown, and figures drawn into the report's image folder.

    Each figure is a file name and a function that draws it to a path; the markdown
    refers to it as ``img/<name>``.
    """

    title: str
    markdown: str
    figures: dict[str, Callable[[Path], None]] = field(default_factory=dict)


@runtime_checkable
class Suite(Protocol):
    """A benchmark: options, parameters, a measurement and a rendering of its result."""

    name: str
    title: str

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        """The suite's own command-line options (``--quick`` is the runner's)."""

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        """What the run measures (sizes, repeats, grids): JSON values, stored with the result."""

    def key(self, params: Mapping[str, Any]) -> str:
        """The result's file stem: the suite name plus whatever parameter changes the page."""

    def run(self, ctx: Context) -> dict[str, Any]:
        """Measure; return JSON-serializable data (what ``render`` reads, nothing else)."""

    def render(self, result: Result) -> Page:
        """Markdown (and figures) from a stored result, without measuring anything."""


class BaseSuite:
    """Defaults for the optional parts of ``Suite``: no options, no parameters."""

    name = ""
    title = ""

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        return None

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        return {}

    def key(self, params: Mapping[str, Any]) -> str:
        return self.name

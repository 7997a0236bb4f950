"""The quality-by-map suite: measurement in benchmarks.quality_maps, page in _report."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks.quality_maps import SEED_SETS, SUITES, run_capacity, run_suite
from benchmarks.quality_maps_report import report
from benchmarks.suite import BaseSuite, Context, Page, Result


class QualityMapsSuite(BaseSuite):
    name = "quality_maps"
    title = "Quality by map"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--suite", default="all", help=f"comma list of {','.join(SUITES)}, or all")
        ap.add_argument("--sets", type=int, default=len(SEED_SETS), help="seed sets per variant")
        ap.add_argument("--no-capacity", action="store_true", help="skip the capacity run")
        ap.add_argument("--threads", type=int, default=1)

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        suites = list(SUITES) if args.suite == "all" else args.suite.split(",")
        unknown = [s for s in suites if s not in SUITES]
        if unknown:
            raise SystemExit(f"error: unknown suite(s) {unknown}; known: {list(SUITES)}")
        if quick and args.suite == "all":
            suites = ["digits-8"]
        sets = 1 if quick and args.sets == len(SEED_SETS) else args.sets
        capacity = not args.no_capacity and not quick
        return {"suites": suites, "sets": sets, "capacity": capacity, "threads": args.threads}

    def key(self, params: Mapping[str, Any]) -> str:
        suites = list(params["suites"])
        return self.name if suites == list(SUITES) else f"{self.name}-{'-'.join(suites)}"

    def run(self, ctx: Context) -> dict[str, Any]:
        torch.set_num_threads(ctx.params["threads"])
        p = ctx.params
        data: dict[str, Any] = {
            "suites": {n: run_suite(n, p["sets"], ctx.work, ctx.quick) for n in p["suites"]}
        }
        data["capacity"] = run_capacity(ctx.work) if p["capacity"] else None
        return data

    def render(self, result: Result) -> Page:
        d = result.data
        return Page(self.title, report(d["suites"], d["capacity"], result.params["sets"]))

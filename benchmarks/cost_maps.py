"""Cost of each sign map: fold and materialize time and peak memory, side by side.

    .venv/bin/python -m benchmarks run cost_maps            # GPT-2 small shapes (124M)
    .venv/bin/python -m benchmarks run cost_maps --quick    # a tiny model

Question answered: does the elementwise map (a sign per entry, drawn from the seed in
chunks) slow a fold or a retrieval against column flips, or raise peak memory?

Method (the protocol of benchmarks/cost.py, whose generator, fork server and memory
sampler it reuses): a GPT-2-shaped fp32 base and two fine-tunes are generated on disk;
for each map, task 1 is folded once (untimed), then, in one loop, task 2 is folded onto
that map's 1-task superposition and task 1 materialized from the 2-task superposition
(fp32 master), each run in a fresh forked process, the maps in rotating order within
each repeat, with torch's default threads and with one thread. Ratios are paired: each
map's run against the column map's run of the same repeat and thread mode. Every fold
of a map must write the same bytes in every repeat (determinism check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import cost_measure as cost
from benchmarks.cost_models import GPT2_SMALL, MB, ModelSpec, generate, hash_name
from benchmarks.suite import BaseSuite, Context, Page, Result
from randes.config import MAPS, TransformConfig

QUICK = ModelSpec("quick", layers=2, d=128, vocab=2048, ctx=128)


def _cfg(kind: str) -> dict[str, Any]:
    return TransformConfig(map=kind).model_dump(mode="json")  # type: ignore[arg-type]


def run(spec: ModelSpec, root: Path, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    base, task_dirs = generate(spec, root, 2)
    print(f"generated {spec.params() / 1e6:.1f}M parameters in {time.perf_counter() - t0:.0f}s")
    seeds = [hash_name("task-seed-1"), hash_name("task-seed-2")]
    first: dict[str, dict[str, Any]] = {}
    for kind in MAPS:
        first[kind] = cost.spawn(
            {
                "op": "fold",
                "base": str(base),
                "checkpoint": str(task_dirs[0]),
                "parent": [],
                "seed": seeds[0],
                "out": str(root / f"f1-{kind}"),
                "config": _cfg(kind),
            }
        )
    runs: list[dict[str, Any]] = []
    shas: dict[str, set[str]] = {k: set() for k in MAPS}
    second: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        for threads in (None, 1):
            order = list(MAPS[r % len(MAPS) :] + MAPS[: r % len(MAPS)])
            for kind in order:
                out = root / f"f2-{kind}-{r}-{threads or 0}"
                res = cost.spawn(
                    {
                        "op": "fold",
                        "base": str(base),
                        "checkpoint": str(task_dirs[1]),
                        "parent": cost._files(first[kind]["superposition"]),
                        "seed": seeds[1],
                        "out": str(out),
                        "threads": threads,
                        "config": _cfg(kind),
                    }
                )
                shas[kind].add(",".join(s["sha256"] for s in res["superposition"]))
                runs.append({"op": "fold", "map": kind, "r": r, "threads": threads, **_m(res)})
                if kind not in second:
                    second[kind] = res  # kept: the superposition materialize reads
                else:
                    shutil.rmtree(out, ignore_errors=True)
                mat_out = root / f"m-{kind}-{r}-{threads or 0}"
                res = cost.spawn(
                    {
                        "op": "materialize",
                        "base": str(base),
                        "superposition": cost._files(second[kind]["superposition"]),
                        "private": cost._files(first[kind]["private"]),
                        "seed": seeds[0],
                        "key_map": first[kind]["key_map"],
                        "out": str(mat_out),
                        "threads": threads,
                        "config": _cfg(kind),
                    }
                )
                runs.append(
                    {"op": "materialize", "map": kind, "r": r, "threads": threads, **_m(res)}
                )
                shutil.rmtree(mat_out, ignore_errors=True)
                print(f"r={r} threads={threads or 'default'} {kind}: done", flush=True)
    for map_name, s in shas.items():
        if len(s) != 1:
            raise RuntimeError(f"{map_name}: folds of the same inputs wrote different bytes")
    return {
        "spec": spec,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "load": (load0, os.getloadavg()[0]),
    }


def _m(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res[k] for k in ("wall", "peak_rss", "peak_anon", "idle_rss")}


def report(res: dict[str, Any]) -> str:
    runs = res["runs"]
    spec: ModelSpec = res["spec"]
    med = statistics.median

    def pick(op: str, kind: str, threads: int | None) -> list[dict[str, Any]]:
        return [x for x in runs if x["op"] == op and x["map"] == kind and x["threads"] == threads]

    rows = []
    verdict = []
    for op in ("fold", "materialize"):
        for threads in (None, 1):
            ref = {x["r"]: x for x in pick(op, "columns", threads)}
            for kind in MAPS:
                xs = pick(op, kind, threads)
                ratios = [x["wall"] / ref[x["r"]]["wall"] for x in xs]
                rss = max(x["peak_rss"] for x in xs)
                rows.append(
                    f"| {op} | {'default' if threads is None else '1 thread'} | `{kind}` |"
                    f" {med([x['wall'] for x in xs]):.2f} | **{med(ratios):.2f}x** |"
                    f" {rss / MB:.0f} | {(rss - ref[0]['peak_rss']) / MB:+.0f} |"
                )
                if kind == TransformConfig().map and kind != "columns":
                    verdict.append((op, threads, med(ratios), rss - ref[0]["peak_rss"]))
    lines = [
        f"Measurement loop: {res['seconds'] / 60:.1f} min.",
        "",
        f"Model: GPT-2-shaped fp32, {spec.layers} layers x d {spec.d}, vocab {spec.vocab}:"
        f" {spec.params() / 1e6:.1f}M parameters (largest tensor"
        f" {spec.largest_bytes() / MB:.0f} MB). Method: the docstring of"
        " `benchmarks/cost_maps.py` (fold of task 2 onto a 1-task superposition; materialize"
        " of task 1 from the 2-task master; fresh process per run; maps interleaved in"
        " rotating order; ratios paired with the `columns` run of the same repeat and thread"
        " mode; median over repeats). Default config otherwise (layer shuffle, rank1 flip,"
        " int4-g64 serving copy written by every fold).",
        "",
        "| operation | threads | map | wall (s, median) | ratio to columns (paired median)"
        " | peak RSS (MB, max) | vs columns (MB) |",
        "|---|---|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    mem = max(v[3] for v in verdict) if verdict else float("nan")
    for threads in (None, 1):
        got = [v for v in verdict if v[1] == threads]
        worst = max(v[2] for v in got) if got else float("nan")
        mode = "default threads" if threads is None else "1 thread"
        lines.append(
            f"- Default map `{TransformConfig().map}` against column flips, {mode}: fold"
            f" {got[0][2]:.2f}x, materialize {got[1][2]:.2f}x (target <= 1.2x:"
            f" **{'PASS' if worst <= 1.2 else 'FAIL'}**)."
        )
    lines.append(
        f"- Peak RSS of the default map against column flips: at most {mem / MB:+.0f} MB"
        " (the signs are drawn 2^20 entries at a time: 4 MiB of float32 signs, never a"
        " tensor-sized mask)."
    )
    lines.append(
        f"- Load average {res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end:"
        " other sessions share these 2 cores. With torch's default 2 threads every parallel"
        ' op can wait for a descheduled OpenMP thread (see "Cost"), and the elementwise'
        " map runs one parallel op per 2^20 entries where column flips run one per tensor,"
        " so that mode is the one the load inflates most."
    )
    return "\n".join(lines) + "\n"


class CostMapsSuite(BaseSuite):
    name = "cost_maps"
    title = "Cost by map"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--repeats", type=int, default=3)

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        repeats = 1 if quick and args.repeats == 3 else args.repeats
        return {"spec": asdict(QUICK if quick else GPT2_SMALL), "repeats": repeats}

    def run(self, ctx: Context) -> dict[str, Any]:
        spec = ModelSpec(**ctx.params["spec"])
        with cost.serving():
            res = run(spec, ctx.work / "maps", ctx.params["repeats"])
        return res | {"spec": asdict(spec)}

    def render(self, result: Result) -> Page:
        res = dict(result.data) | {"spec": ModelSpec(**result.data["spec"])}
        return Page(self.title, report(res))

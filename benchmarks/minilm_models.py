"""The MiniLM suite's references: fine-tuned, probe and floor accuracy of every task.

    .venv/bin/python -m benchmarks run minilm_models             # train what is missing
    .venv/bin/python -m benchmarks run minilm_models --quick     # a few steps, scratch dir

The models themselves (recipe, cache, evaluator) are benchmarks.minilm_suite's; this
suite trains or loads them and records what the quality benchmarks compare against.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.suite import BaseSuite, Context, Page, Result

QUICK_STEPS = {"probe_steps": 5, "finetune_steps": 4, "warmup_steps": 2}
"""``--quick``: enough steps to run every code path, far too few to learn anything."""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


class MiniLMModelsSuite(BaseSuite):
    name = "minilm_models"
    title = "MiniLM suite: fine-tuned references"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--models-dir", type=Path, default=None)
        ap.add_argument("--retrain", action="store_true", help="train every task again")
        ap.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch threads for evaluation (training always uses 1); default 1: on a "
            "shared 2-core machine a second thread made evaluation up to 4x slower (measured)",
        )

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        from benchmarks.minilm_suite import Recipe

        recipe = replace(Recipe(), **QUICK_STEPS) if quick else Recipe()
        return {"recipe": asdict(recipe), "threads": max(1, args.threads)}

    def run(self, ctx: Context) -> dict[str, Any]:
        import torch

        from benchmarks.minilm_data import load_task
        from benchmarks.minilm_suite import DEFAULT_MODELS_DIR, Recipe, build_suite

        torch.set_num_threads(ctx.params["threads"])
        models = ctx.args.models_dir or (ctx.work / "models" if ctx.quick else DEFAULT_MODELS_DIR)
        t0 = time.perf_counter()
        suite = build_suite(
            models, retrain=ctx.args.retrain, log=True, recipe=Recipe(**ctx.params["recipe"])
        )
        build_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for task in suite.tasks:
            suite.accuracy(task, suite.tuned[task], "test")
        eval_s = (time.perf_counter() - t1) / len(suite.tasks)
        tasks = {}
        for task in suite.tasks:
            data = load_task(task)
            tasks[task] = {
                "classes": len(data.classes),
                "sizes": {s: data.size(s) for s in ("train", "val", "test")},
                "finetuned": suite.finetuned_acc[task],
                "probe": suite.probe_acc[task],
                "floor": suite.floor_acc[task],
                "rel_delta": suite.rel_delta[task],
                "train_s": suite.train_s[task],
            }
        return {"tasks": tasks, "build_s": build_s, "eval_s": eval_s}

    def render(self, result: Result) -> Page:
        from flows.training import TRAIN_THREADS

        d = result.data
        lines = [
            "| task | classes | train/val/test | probe test | base+ft head test | ft val |"
            " ft test | gain | ‖δ‖/‖base‖ | train s |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for task, t in d["tasks"].items():
            ft, probe = t["finetuned"], t["probe"]
            sizes = "/".join(str(t["sizes"][s]) for s in ("train", "val", "test"))
            lines.append(
                f"| {task} | {t['classes']} | {sizes} | {_pct(probe['test'])} |"
                f" {_pct(t['floor']['test'])} | {_pct(ft['val'])} | {_pct(ft['test'])} |"
                f" {100 * (ft['test'] - probe['test']):+.1f} | {100 * t['rel_delta']:.2f}% |"
                f" {t['train_s']:.0f} |"
            )
        total = sum(t["train_s"] for t in d["tasks"].values())
        lines += [
            "",
            f"Training (recorded, {TRAIN_THREADS} thread): {total:.0f} s for {len(d['tasks'])}"
            f" tasks; this run: build/load {d['build_s']:.1f} s; one test-split evaluation"
            f" {d['eval_s']:.2f} s ({result.params['threads']} thread(s)).",
        ]
        return Page(self.title, "\n".join(lines))

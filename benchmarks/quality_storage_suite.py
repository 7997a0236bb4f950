"""The quality-against-storage suite: one result file holds every model suite it ran.

    .venv/bin/python -m benchmarks run quality_storage --suite all     # digits + MiniLM
    .venv/bin/python -m benchmarks run quality_storage --quick         # digits-8, small plan

Measurement: benchmarks.quality_storage; the stored ``SuiteResult`` of each model suite
is rendered by benchmarks.quality_storage_blocks / _findings into one page.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality_storage import (
    LAMBDA_ONLY,
    LIMITS,
    MINILM_PLAN,
    QUICK,
    Plan,
    Row,
    SuiteResult,
    calibrate,
    run_budget,
    run_capacity,
    run_suite,
)
from benchmarks.quality_storage_findings import ORDER
from benchmarks.suite import BaseSuite, Context, Page, Result
from randes.capacity import DEFAULT_MAX_INTERFERENCE
from randes.scaling import NOISE_GAIN


@dataclass
class SuiteFacts:
    """What the tables read about a model suite once it is measured: its name and words."""

    name: str
    description: str = ""
    notes: list[str] = field(default_factory=list)


def to_json(res: SuiteResult, calibrated: float | None) -> dict[str, Any]:
    data = asdict(res) | {"suite": asdict(SuiteFacts(res.suite.name, res.suite.description))}
    data["suite"]["notes"] = list(res.suite.notes)
    for row in data["rows"]:
        row.pop("store_key", None)  # the in-memory cache key of a store: not a result
    data["gains"] = {f: [[g, v] for g, v in d.items()] for f, d in res.gains.items()}
    data["sweep"] = {f: [[g, list(v)] for g, v in d.items()] for f, d in res.sweep.items()}
    return {"result": data, "calibrated": calibrated}


def from_json(raw: Mapping[str, Any]) -> tuple[SuiteResult, float | None]:
    d = dict(raw["result"])
    res = SuiteResult(
        suite=SuiteFacts(**d["suite"]),  # type: ignore[arg-type]
        base_bytes=d["base_bytes"],
        rows=[Row(**r) for r in d["rows"]],
        lam=d["lam"],
        gains={f: {float(g): v for g, v in rows} for f, rows in d["gains"].items()},
        gain_test={f: tuple(v) for f, v in d["gain_test"].items()},  # type: ignore[misc]
        sweep={f: {float(g): tuple(v) for g, v in rows} for f, rows in d["sweep"].items()},  # type: ignore[misc]
        capacity=d["capacity"],
        budget=d["budget"],
        evals=d["evals"],
        seconds=d["seconds"],
        serving_diff=d["serving_diff"],
    )
    return res, raw["calibrated"]


class QualityStorageSuite(BaseSuite):
    name = "quality_storage"
    title = "Quality against storage"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--suite", choices=("digits", "minilm", "all"), default="digits")
        ap.add_argument("--no-large", action="store_true", help="skip the large-delta suite")
        ap.add_argument("--retrain", action="store_true", help="ignore cached models")
        ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        return {
            "suite": args.suite,
            "large": not args.no_large and not quick,
            "threads": args.threads,
            "constants": {
                "NOISE_GAIN": NOISE_GAIN,
                "DEFAULT_MAX_INTERFERENCE": DEFAULT_MAX_INTERFERENCE,
            },
        }

    def key(self, params: Mapping[str, Any]) -> str:
        return self.name if params["suite"] == "all" else f"{self.name}-{params['suite']}"

    def run(self, ctx: Context) -> dict[str, Any]:
        import torch

        from benchmarks import storage_suites as ss

        torch.set_num_threads(ctx.params["threads"])
        p, quick, work, log = ctx.params, ctx.quick, ctx.work, ctx.log
        retrain = bool(ctx.args.retrain)
        out: dict[str, Any] = {}
        main_plan: Plan = QUICK if quick else Plan()
        side_plan: Plan = QUICK if quick else LAMBDA_ONLY
        if p["suite"] in ("digits", "all"):
            res8, m8, f8, ev8 = run_suite(
                ss.digits(8, retrain=retrain, quick=quick), main_plan, work / "d8", log
            )
            run_capacity(res8, m8, f8, ev8, LIMITS, work / "d8c", log)
            if not quick:
                run_budget(res8, m8, f8, ev8, work / "d8b", log)
            out[res8.suite.name] = to_json(res8, None)
            if not quick:
                s13 = ss.digits(13, retrain=retrain)
                res13, m13, f13, ev13 = run_suite(s13, side_plan, work / "d13", log)
                run_capacity(res13, m13, f13, ev13, LIMITS, work / "d13c", log)
                out[res13.suite.name] = to_json(res13, calibrate(res13.capacity))
            if p["large"]:
                sl = ss.digits(8, large=True, retrain=retrain)
                resl, ml, fl, evl = run_suite(sl, side_plan, work / "dl", log)
                run_capacity(resl, ml, fl, evl, LIMITS, work / "dlc", log)
                out[resl.suite.name] = to_json(resl, None)
        if p["suite"] in ("minilm", "all"):
            resm, *_ = run_suite(ss.minilm(), QUICK if quick else MINILM_PLAN, work / "mm", log)
            out[resm.suite.name] = to_json(resm, None)
        return out

    def render(self, result: Result) -> Page:
        from benchmarks.quality_storage_blocks import plot, suite_block
        from benchmarks.quality_storage_findings import findings, summarize

        loaded = {n: from_json(result.data[n]) for n in ORDER if n in result.data}
        sums = {n: summarize(res, cal) for n, (res, cal) in loaded.items()}  # type: ignore[arg-type]
        lines = [*preamble(), *findings(sums)]
        figures: dict[str, Callable[[Path], None]] = {}
        for name, (res, cal) in loaded.items():
            lines += suite_block(res, result.meta.command, cal)  # type: ignore[arg-type]
            if name in ("digits-8", "minilm"):
                img = f"storage_frontier_{'digits' if name == 'digits-8' else 'minilm'}.png"
                lines += [f"![quality against storage, {name}](img/{img})", ""]
        digits = [loaded[n][0] for n in ORDER if n.startswith("digits") and n in loaded]
        if digits:
            figures["storage_frontier_digits.png"] = lambda path: plot(digits, path)  # type: ignore[arg-type]
        if "minilm" in loaded:
            mm = loaded["minilm"][0]
            figures["storage_frontier_minilm.png"] = lambda path: plot([mm], path)  # type: ignore[list-item]
        return Page(self.title, "\n".join(lines), figures)


def preamble() -> list[str]:
    return [
        "Total bytes = fp32 base + superposition in its serving format + private tensors"
        ' (task heads; rank-1 tensors under `rank1="private"`), tensor payloads only:'
        " safetensors headers and manifests are excluded. Quantized formats are"
        " `randes.quantize` applied to every slot of the folded fp32 superposition"
        " (`fake_quantize`: exactly what a serving artifact decodes to); bf16 is a round"
        " trip of the same master. Task arithmetic stores one merged fp32 model (it needs"
        " no base), or the base plus its merged delta quantized. BitDelta is the data-free"
        " initialization (sign bits + one fp32 scale, mean |delta|, per task and matrix; no"
        " distillation) with the same private tensors as RanDeS. Every fixed lambda is"
        " chosen on the validation split and reported on test; the data-free lambda"
        f" (`randes.scaling.data_free_scale`, NOISE_GAIN {NOISE_GAIN:g}) uses stored norms"
        " only. Lambdas are applied rounded to 3 decimals. Normalized accuracy = retrieved"
        " test accuracy / fine-tuned test accuracy, mean over tasks; the worst task is named.",
        "",
    ]

"""Cost part ``fold_cli``: one `randes fold` end to end against a plain safetensors copy.

Question answered (issue 15, Must-show 1): on the 311M-parameter GPT-2-shaped model (24
layers x 1024, vocabulary 8192: 311.7M parameters, 1.25 GB per fp32 checkpoint; the
GPT-2 vocabulary of 50257 would make it 354.8M), is one `randes fold` on the embedded
default (SQLite registry + local store under a fresh RANDES_HOME) within 2x of a plain
safetensors read of base + checkpoint and write of one model-sized file, side by side
(median of the paired ratios), with a peak memory <= 800 MB, flat from fold to fold?

Method:

- A base and ``1 + repeats`` fine-tunes are generated (`benchmarks.cost_models.generate`:
  GPT-2 names; fine-tunes saved like ``GPT2ForSequenceClassification``, ``transformer.``
  prefix and a ``score.weight`` head).
- Each code variant (this checkout, and with ``--cli-old PATH`` another checkout, run by
  the same interpreter with PYTHONPATH=PATH) gets its own fresh RANDES_HOME: ``init``,
  ``base add``, ``bundle create`` (default config: elementwise map, int4-g64 serving
  copy) and an untimed fold of task 1. Timed fold r (r = 2..repeats+1) folds task r onto
  version r-1: it reads base + checkpoint + parent master and writes the new master and
  its serving copy, the steady state of a bundle.
- Every timed run is a fresh process, ``os.sync()`` before it, its imports included: the
  `randes fold` command line, and the baseline ``python -c`` that imports
  safetensors.torch, ``load_file`` s base and checkpoint (``backend="pread"``: every byte
  read) and ``save_file`` s the checkpoint's tensors. Runs are interleaved in rotating
  order, repeat by repeat; a ratio is a fold's wall time over the baseline's of the same
  repeat.
- CPU seconds (user, sys) are the child's own (``wait4``); peak memory is the fold
  process's ``VmHWM``, read from /proc/self/status at its exit by a wrapper around the
  command line's entry point.

    .venv/bin/python -m benchmarks.cost --parts fold_cli [--cli-old /path/to/old/checkout]

Disk: (2 + repeats) checkpoints plus, per variant, about 4 x 1.4 GB of store and cache
(after each fold, untimed, ``randes gc --keep-last 1`` and a prune of the cache keep one
version); all under the run's scratch directory, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.cost_models import ROOT, ModelSpec, generate

CLI_MODEL = ModelSpec("gpt2-311m", layers=24, d=1024, vocab=8192, ctx=1024)
CLI_QUICK = ModelSpec("gpt2-cli-quick", layers=2, d=256, vocab=1024, ctx=256)
GOAL_RATIO = 2.0
GOAL_RSS = 800_000_000

_WRAPPER = """
import atexit, sys
def _peak(path):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                with open(path, "w") as out:
                    out.write(str(int(line.split()[1]) * 1024))
atexit.register(_peak, sys.argv.pop(1))
sys.argv[0] = "randes"
from flows.cli import entry
entry()
"""

_BASELINE = """
import sys
from safetensors.torch import load_file, save_file
base = load_file(sys.argv[1], backend="pread")
tuned = load_file(sys.argv[2], backend="pread")
save_file(tuned, sys.argv[3])
"""


def _env(code: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDES_")}
    return env | {
        "RANDES_HOME": str(home),
        "PYTHONPATH": str(code),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run ``argv`` to completion: its wall time and its own user / sys CPU seconds
    (``wait4``)."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[3:]} failed ({proc.returncode}):\n{out}{err}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime}


def _randes(code: Path, home: Path, *args: str) -> dict[str, float]:
    peak = home.parent / "peak"
    run = _run([sys.executable, "-c", _WRAPPER, str(peak), *args], _env(code, home), code)
    return run | {"peak_rss": int(peak.read_text())}


def _reclaim(code: Path, home: Path) -> None:
    """Untimed, after each fold: drop every version but the head (``randes gc
    --keep-last 1``) and the cached copies of objects the store no longer holds, so
    the disk holds one bundle version per variant, not one per repeat."""
    _randes(code, home, "gc", "--grace", "0", "--keep-last", "1")
    stored = {p.name for p in (home / "store").rglob("*") if p.is_file()}
    for cached in (home / "cache" / "objects").glob("*"):
        if cached.name.split(".", 1)[0] not in stored:
            cached.unlink()


def measure_cli(
    spec: ModelSpec, repeats: int, work: Path, log: Callable[[str], None], old: Path | None
) -> dict[str, Any]:
    """Set up a home per variant, then fold tasks 2..repeats+1 interleaved with the
    plain baseline; the raw runs (see the module docstring)."""
    variants = {"new": ROOT} | ({"old": old.resolve()} if old is not None else {})
    models = work / "cli-models"
    base_file, tasks = generate(spec, models, 1 + repeats)
    size = base_file.stat().st_size
    log(f"fold_cli: {spec.params() / 1e6:.1f}M parameters, {size / 1e9:.2f} GB per checkpoint")
    homes = {name: work / f"cli-{name}" / "home" for name in variants}
    for name, code in variants.items():
        homes[name].parent.mkdir()
        for argv in (
            ["init"],
            ["base", "add", "gpt2m", str(base_file)],
            ["bundle", "create", "b", "--base", "gpt2m"],
            ["fold", "b", str(tasks[0]), "--task", "t1"],
        ):
            _randes(code, homes[name], *argv)
        log(f"fold_cli: {name} ({code}): version 1 ready")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*variants, "plain"]}
    order = [*variants, "plain"]
    for r in range(repeats):
        task = r + 2
        for name in order[r % len(order) :] + order[: r % len(order)]:
            if name == "plain":
                out = work / "plain.safetensors"
                ck = tasks[r + 1] / "model.safetensors"
                argv = [sys.executable, "-c", _BASELINE, str(base_file), str(ck), str(out)]
                run = _run(argv, _env(ROOT, work / "unused"), ROOT)
                out.unlink()
            else:
                ck_dir = str(tasks[r + 1])
                run = _randes(
                    variants[name], homes[name], "fold", "b", ck_dir, "--task", f"t{task}"
                )
                _reclaim(variants[name], homes[name])
            runs[name].append(run)
            log(
                f"fold_cli: repeat {r + 1} {name}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in run.items() if k != "peak_rss")
            )
    for name in variants:
        shutil.rmtree(homes[name].parent, ignore_errors=True)
    return {
        "model": spec.name,
        "params": spec.params(),
        "checkpoint_bytes": size,
        "variants": {k: str(v) for k, v in variants.items()},
        "runs": runs,
    }


def render_cli(data: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    """Per-run table, medians, paired ratios and one verdict line per goal."""
    runs = data["runs"]
    plain = runs["plain"]
    lines = [
        f"Model: GPT-2-shaped fp32 {data['model']}, {data['params'] / 1e6:.1f}M parameters, "
        f"{data['checkpoint_bytes'] / 1e9:.2f} GB per checkpoint. Variants: "
        + ", ".join(f"`{k}` = {v}" for k, v in data["variants"].items())
        + ". Method: the docstring of `benchmarks/cost_cli.py`.",
        "",
        "| run | repeat | wall (s) | user (s) | sys (s) | peak RSS (MB) | ratio to plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        for i, x in enumerate(rs):
            peak = f"{x['peak_rss'] / 1e6:.0f}" if "peak_rss" in x else ""
            lines.append(
                f"| {name} | {i + 1} | {x['wall']:.1f} | {x['user']:.1f} | {x['sys']:.1f} "
                f"| {peak} | {x['wall'] / plain[i]['wall']:.2f}x |"
            )
    lines.append("")
    for name, rs in runs.items():
        if name == "plain":
            continue
        ratio = statistics.median(x["wall"] / p["wall"] for x, p in zip(rs, plain, strict=True))
        peaks = [x["peak_rss"] for x in rs]
        flat = max(peaks) - min(peaks) <= 0.05 * max(peaks)
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall", "user", "sys")}
        base_wall = statistics.median(p["wall"] for p in plain)
        lines += [
            f"- `{name}`: one fold {med['wall']:.1f} s (user {med['user']:.1f} s, sys "
            f"{med['sys']:.1f} s) against plain {base_wall:.1f} s:"
            f" {ratio:.2f}x (median of paired ratios): "
            f"**{'PASS' if ratio <= GOAL_RATIO else 'FAIL'}** (goal <= {GOAL_RATIO:g}x)",
            f"- `{name}`: peak RSS {min(peaks) / 1e6:.0f}..{max(peaks) / 1e6:.0f} MB over the "
            f"{len(peaks)} folds: **{'PASS' if max(peaks) <= GOAL_RSS and flat else 'FAIL'}** "
            f"(goal <= {GOAL_RSS / 1e6:.0f} MB, flat within 5%)",
        ]
    return lines

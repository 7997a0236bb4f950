"""One `randes fold` end to end against a plain safetensors read + write (issue 15, Must-show 1).

Question answered: on the 311M-parameter GPT-2-shaped model (24 layers x 1024, 1.25 GB
per fp32 checkpoint), is one `randes fold` on the embedded default (SQLite registry +
local store under a fresh RANDES_HOME) within 2x of a plain safetensors read of base +
checkpoint and write of one model-sized file, measured side by side (median of the
paired ratios), with a peak memory <= 800 MB that stays flat from fold to fold?

Method:

- A base and ``1 + repeats`` fine-tunes are generated on disk in a temp dir (tensor by
  tensor, `benchmarks.cost.generate`: GPT-2 names, fine-tunes saved like
  ``GPT2ForSequenceClassification`` with a ``transformer.`` prefix and a ``score.weight``
  head). The vocabulary is 8192 so the model has the 311.7M parameters of the issue
  (the GPT-2 vocabulary of 50257 would make it 354.8M).
- Each code variant under test (the working tree, and with ``--old PATH`` a checkout of
  older code, run with the same interpreter and PYTHONPATH=PATH) gets its own fresh
  RANDES_HOME: ``init``, ``base add``, ``bundle create`` (defaults: elementwise map,
  int4-g64 serving copy) and an untimed fold of task 1. Then fold r (r = 2..repeats+1)
  folds task r onto version r-1: it reads base + checkpoint + parent master and writes
  the new master + serving copy, the steady state of a bundle.
- Every timed run is a fresh process started by this (torch-free) parent, ``os.sync()``
  before it: the `randes fold` command line (imports included), and the baseline
  ``python -c`` that imports safetensors.torch, ``load_file`` s base and checkpoint
  (``backend="pread"``, every byte read) and ``save_file`` s the checkpoint's tensors
  (imports included too). Runs are interleaved in rotating order, repeat by repeat;
  the ratio is each fold's wall time over the baseline of the same repeat.
- CPU time (user, sys) is the child's own, from ``wait4``; peak memory is the fold
  process's ``VmHWM`` read from /proc/self/status at its exit (a wrapper around the
  command line's entry point; ``ru_maxrss`` would carry the parent's high-water mark).

    .venv/bin/python benchmarks/fold_e2e.py [--repeats 3] [--old /tmp/speed-base] [--json OUT]

Needs about (2 + repeats) x 1.25 GB of models plus 2 x (repeats + 2) x 1.4 GB of homes
per variant in the temp dir; everything is removed at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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

_GENERATE = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from benchmarks.cost import ModelSpec, generate
spec = ModelSpec("gpt2-311m", layers=int(sys.argv[3]), d=int(sys.argv[4]),
                 vocab=int(sys.argv[5]), ctx=1024)
print(spec.params())
generate(spec, Path(sys.argv[2]), int(sys.argv[6]))
"""


@dataclass
class Run:
    wall: float
    user: float
    sys: float
    peak_rss: int | None = None


def _env(code: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDES_")}
    env |= {
        "RANDES_HOME": str(home),
        "PYTHONPATH": str(code),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    return env


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> Run:
    """Run ``argv`` to completion; its wall time and its own user/sys CPU seconds."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]}... failed ({proc.returncode}):\n{out}\n{err}")
    return Run(wall, usage.ru_utime, usage.ru_stime)


def randes(code: Path, home: Path, *args: str, peak_file: Path | None = None) -> Run:
    peak = peak_file or home.parent / "peak"
    run = timed([sys.executable, "-c", _WRAPPER, str(peak), *args], _env(code, home), code)
    run.peak_rss = int(peak.read_text())
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--old", type=Path, help="a checkout of older code to compare with")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temp dir goes")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    variants = {"new": ROOT} | ({"old": args.old.resolve()} if args.old else {})
    tmp = Path(tempfile.mkdtemp(prefix="fold-e2e-", dir=args.tmp))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    results: dict[str, Any] = {"variants": {k: str(v) for k, v in variants.items()}}
    try:
        models = tmp / "models"
        gen = subprocess.run(
            [sys.executable, "-c", _GENERATE, str(ROOT), str(models), str(args.layers),
             str(args.d), str(args.vocab), str(1 + args.repeats)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        params = int(gen.stdout.split()[0])
        base = models / "base" / "model.safetensors"
        size = base.stat().st_size
        results |= {"params": params, "checkpoint_bytes": size, "uptime_start": _uptime()}
        log(f"{params / 1e6:.1f}M parameters, {size / 1e9:.2f} GB per checkpoint")
        homes = {name: tmp / name / "home" for name in variants}
        for name, code in variants.items():
            homes[name].parent.mkdir()
            for argv in (
                ["init"],
                ["base", "add", "gpt2m", str(base)],
                ["bundle", "create", "b", "--base", "gpt2m"],
                ["fold", "b", str(models / "task1"), "--task", "t1"],
            ):
                randes(code, homes[name], *argv)
            log(f"{name}: version 1 ready")
        runs: dict[str, list[Run]] = {name: [] for name in variants} | {"plain": []}
        order = [*variants, "plain"]
        for r in range(args.repeats):
            task = r + 2
            for name in order[r % len(order) :] + order[: r % len(order)]:
                if name == "plain":
                    out = tmp / "plain.safetensors"
                    env = _env(ROOT, tmp / "unused")
                    ck = models / f"task{task}" / "model.safetensors"
                    argv = [sys.executable, "-c", _BASELINE, str(base), str(ck), str(out)]
                    run = timed(argv, env, ROOT)
                    out.unlink()
                else:
                    ck_dir = str(models / f"task{task}")
                    run = randes(
                        variants[name], homes[name], "fold", "b", ck_dir, "--task", f"t{task}"
                    )
                runs[name].append(run)
                log(f"repeat {r + 1} {name}: {run}")
        results["runs"] = {k: [vars(x) for x in v] for k, v in runs.items()}
        results["uptime_end"] = _uptime()
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def report(results: dict[str, Any]) -> str:
    """Markdown: per-run table, medians, paired ratios and the verdict lines."""
    runs = results["runs"]
    plain = runs["plain"]
    lines = [
        "| run | repeat | wall (s) | user (s) | sys (s) | peak RSS (MB) | ratio to plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        for i, x in enumerate(rs):
            ratio = x["wall"] / plain[i]["wall"]
            peak = f"{x['peak_rss'] / 1e6:.0f}" if x.get("peak_rss") else ""
            lines.append(
                f"| {name} | {i + 1} | {x['wall']:.1f} | {x['user']:.1f} | {x['sys']:.1f} "
                f"| {peak} | {ratio:.2f}x |"
            )
    lines.append("")
    for name, rs in runs.items():
        if name == "plain":
            continue
        ratio = statistics.median(x["wall"] / p["wall"] for x, p in zip(rs, plain, strict=True))
        peaks = [x["peak_rss"] for x in rs]
        flat = max(peaks) - min(peaks) < 0.05 * max(peaks)
        lines += [
            f"- {name}: fold {statistics.median(x['wall'] for x in rs):.1f} s "
            f"(user {statistics.median(x['user'] for x in rs):.1f} s, "
            f"sys {statistics.median(x['sys'] for x in rs):.1f} s), plain "
            f"{statistics.median(p['wall'] for p in plain):.1f} s: ratio {ratio:.2f}x "
            f"(median of paired ratios) -> {'PASS' if ratio <= GOAL_RATIO else 'FAIL'} "
            f"(goal <= {GOAL_RATIO:g}x)",
            f"- {name}: peak RSS {min(peaks) / 1e6:.0f}..{max(peaks) / 1e6:.0f} MB -> "
            f"{'PASS' if max(peaks) <= GOAL_RSS and flat else 'FAIL'} "
            f"(goal <= {GOAL_RSS / 1e6:.0f} MB and flat within 5%)",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

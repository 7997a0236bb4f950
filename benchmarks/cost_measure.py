"""The cost benchmark's measurements: fold k = 1..K and materialize, each against its baseline."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.cost_models import MB, ROOT, ModelSpec, generate, hash_name


class Server:
    def __init__(self, core: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cost_worker"],
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(dict.fromkeys([str(core), str(ROOT)]))},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        os.sync()  # no run pays for the dirty pages of the one before
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fork server died")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"worker {job['op']} failed:\n{out['error']}")
        return out["ok"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


_SERVER: Server | None = None


@contextmanager
def serving(core: Path = ROOT) -> Iterator[None]:
    """Run the fork server (measuring ``core``'s randes) for the ``spawn`` calls inside."""
    global _SERVER
    _SERVER = Server(core)
    try:
        yield
    finally:
        _SERVER.close()
        _SERVER = None


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    assert _SERVER is not None
    return _SERVER.run(job)


def _files(shards: list[dict[str, Any]]) -> list[str]:
    return [s["path"] for s in shards]


def fold_baseline_job(
    base: Path, ckpt: Path, parent: list[str], fold_res: dict[str, Any], out: Path
) -> dict[str, Any]:
    """Read base + checkpoint + parent, write the fold's output tensors' bytes."""
    ckpt_file = str(ckpt / "model.safetensors")
    inputs = [str(base), ckpt_file, *parent]
    sup_tensors = [t for s in fold_res["superposition"] for t in s["tensors"]]
    priv_tensors = [t for s in fold_res["private"] for t in s["tensors"]]
    prefix = fold_res["key_map"]["checkpoint_prefix"]
    return {
        "op": "baseline",
        "inputs": inputs,
        "outputs": [
            # slots are base-shaped: take the checkpoint's tensor of the same name
            {
                "path": str(out / "sup.safetensors"),
                "tensors": [[1, prefix + t] for t in sup_tensors],
            },
            {"path": str(out / "priv.safetensors"), "tensors": [[1, t] for t in priv_tensors]},
        ],
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def run_size(spec: ModelSpec, root: Path, tasks: int, repeats: int, log: Any) -> dict[str, Any]:
    """Generate one model, fold its tasks 1..K, materialize task 1; every run measured.

    Each fold k runs ``repeats`` times with torch's default thread count and ``repeats``
    times with one thread, each pair followed by its baseline. All runs of a fold k must
    produce the same bytes (same sha256): a free determinism check.
    """
    t_gen = time.perf_counter()
    base, task_dirs = generate(spec, root, tasks)
    base_size = base.stat().st_size
    ckpt_size = (task_dirs[0] / "model.safetensors").stat().st_size
    log(
        f"[{spec.name}] {spec.params() / 1e6:.1f}M params, base {base_size / MB:.0f} MB, "
        f"{tasks} fine-tunes generated in {time.perf_counter() - t_gen:.1f}s"
    )
    seeds = [hash_name(f"task-seed-{k}") for k in range(1, tasks + 1)]
    runs: list[dict[str, Any]] = []  # every measured run, tagged op / k / threads
    parent: list[str] = []
    first_private: list[str] = []
    key_map: dict[str, Any] = {}
    bl_dir = root / "baseline"
    prev_dir: Path | None = None
    for k in range(1, tasks + 1):
        kept: Path | None = None
        shas: set[tuple[str, ...]] = set()
        next_parent: list[str] = []
        for r in range(repeats):
            line = [f"[{spec.name}] fold k={k} r={r}:"]
            for threads in (None, 1):
                out = root / f"fold{k}-r{r}-t{threads or 0}"
                res = spawn(
                    {
                        "op": "fold",
                        "base": str(base),
                        "checkpoint": str(task_dirs[k - 1]),
                        "parent": parent,
                        "seed": seeds[k - 1],
                        "out": str(out),
                        "threads": threads,
                    }
                )
                runs.append(res | {"what": "fold", "k": k, "rep": r})
                shas.add(tuple(s["sha256"] for s in res["superposition"] + res["private"]))
                line.append(
                    f"{res['threads']} thr {res['wall']:.2f}s RSS {res['peak_rss'] / MB:.0f} MB"
                    f" (anon {res['peak_anon'] / MB:.0f}) |"
                )
                if kept is None:
                    kept = out
                    next_parent = _files(res["superposition"])
                    if k == 1:
                        first_private = _files(res["private"])
                        key_map = res["key_map"]
                else:
                    shutil.rmtree(out)
            bl_dir.mkdir(exist_ok=True)
            bl = spawn(fold_baseline_job(base, task_dirs[k - 1], parent, res, bl_dir))
            shutil.rmtree(bl_dir)
            runs.append(bl | {"what": "fold baseline", "k": k, "rep": r})
            written = sum(s["size"] for s in res["superposition"] + res["private"])
            assert abs(written - bl["written"]) < 64 * 1024, (written, bl["written"])
            log(" ".join(line) + f" baseline {bl['wall']:.2f}s +fsync {bl['fsync']:.2f}s")
        if len(shas) != 1:
            raise RuntimeError(f"fold {k} gave different bytes across runs: {shas}")
        parent = next_parent
        if prev_dir is not None and k > 2:  # keep fold1 (private of task 1) and the parent
            shutil.rmtree(prev_dir / "superposition")
        prev_dir = kept

    # profile: task 2 folded on the 1-task superposition (refold task 1: no longer on disk)
    profiles: dict[str, dict[str, Any]] = {}
    if tasks >= 2:
        prof_root = root / "profile"
        p1 = spawn(
            {
                "op": "fold",
                "base": str(base),
                "checkpoint": str(task_dirs[0]),
                "parent": [],
                "seed": seeds[0],
                "out": str(prof_root / "one"),
            }
        )
        for threads in (None, 1):
            prof = spawn(
                {
                    "op": "profile",
                    "base": str(base),
                    "checkpoint": str(task_dirs[1]),
                    "parent": _files(p1["superposition"]),
                    "seed": seeds[1],
                    "out": str(prof_root / f"two-{threads}"),
                    "threads": threads,
                }
            )
            profiles[f"{prof['threads']} thread{'s' if prof['threads'] > 1 else ''}"] = prof
        shutil.rmtree(prof_root)

    prefix = key_map["checkpoint_prefix"]
    base_names = set(spec.base_tensors())
    mat_shas: set[str] = set()
    for r in range(repeats):
        line = [f"[{spec.name}] materialize r={r}:"]
        for threads in (None, 1):
            out = root / f"mat-r{r}"
            m = spawn(
                {
                    "op": "materialize",
                    "base": str(base),
                    "superposition": parent,
                    "private": first_private,
                    "seed": seeds[0],
                    "key_map": key_map,
                    "out": str(out),
                    "threads": threads,
                }
            )
            shutil.rmtree(out)
            mat_shas.add(m["sha256"])
            runs.append(m | {"what": "materialize", "k": tasks, "rep": r})
            line.append(
                f"{m['threads']} thr {m['wall']:.2f}s RSS {m['peak_rss'] / MB:.0f} MB"
                f" (anon {m['peak_anon'] / MB:.0f}) |"
            )
        # the model's bytes: base-shaped tensors (from the base) + task-only ones (private)
        tensors = [[0, n[len(prefix) :]] for n in m["tensors"] if n[len(prefix) :] in base_names]
        tensors += [[2, n] for n in m["tensors"] if n[len(prefix) :] not in base_names]
        bl_dir.mkdir(exist_ok=True)
        bl = spawn(
            {
                "op": "baseline",
                "inputs": [str(base), *parent, *first_private],
                "outputs": [{"path": str(bl_dir / "model.safetensors"), "tensors": tensors}],
            }
        )
        shutil.rmtree(bl_dir)
        runs.append(bl | {"what": "materialize baseline", "k": tasks, "rep": r})
        assert abs(m["written"] - bl["written"]) < 64 * 1024, (m["written"], bl["written"])
        log(" ".join(line) + f" baseline {bl['wall']:.2f}s +fsync {bl['fsync']:.2f}s")
    if len(mat_shas) != 1:
        raise RuntimeError(f"materialize gave different bytes across runs: {mat_shas}")
    return {
        "spec": spec,
        "params": spec.params(),
        "base_bytes": base_size,
        "ckpt_bytes": ckpt_size,
        "largest": spec.largest_bytes(),
        "sup_bytes": sum(os.path.getsize(p) for p in parent),
        "runs": runs,
        "profiles": profiles,
        "tasks": tasks,
    }

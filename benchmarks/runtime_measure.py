"""The serving runtime's measurements: correctness, switch, memory, mixed batches.

See the docstring of benchmarks.runtime for the questions and the method."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cost_models import ROOT

SEQ = 32


def _rel(a: Any, b: Any) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------- 1. correctness
def correctness_tiny(tmp: Path) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import load_file

    from randes.config import TransformConfig
    from storage.runtime import BundleRuntime
    from tests.runtime.conftest import _serve
    from tests.runtime.hf_models import inputs

    rows = []
    for arch in ("bert", "gpt2"):
        served = _serve(tmp / arch, arch, TransformConfig())
        with served.workspace() as ws, BundleRuntime.open(served.pulled) as rt:
            exact = 0
            for task in served.tasks:
                want = load_file(
                    str(ws.materialize("b", None, task, tmp / arch / task) / "model.safetensors")
                )
                got = rt.state_dict(task)
                exact += want.keys() == got.keys() and all(
                    torch.equal(got[n], w) for n, w in want.items()
                )
            model = rt.model("t1")
            for task in ("t3", "t1", "t3"):  # t2 has another head shape
                rt.switch(model, task)
            fresh = rt.model("t3")
            switched = all(
                torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items()
            )
            batch = inputs(3, batch=6)
            row_tasks = ["t1", "t3", "t3", "t1", "t3", "t1"]
            with torch.no_grad():
                got_l = rt.mixed(["t1", "t3"])(row_tasks, **batch).logits
                ref = {t: rt.model(t) for t in ("t1", "t3")}
                want_l = torch.cat(
                    [
                        ref[t](**{k: v[i : i + 1] for k, v in batch.items()}).logits
                        for i, t in enumerate(row_tasks)
                    ]
                )
            rows.append(
                {
                    "bundle": f"tiny {arch} ({sum(v.numel() for v in got.values())} "
                    f"parameters), {len(served.tasks)} tasks",
                    "exact": f"{exact}/{len(served.tasks)}",
                    "switched": switched,
                    "mixed_rel": _rel(got_l, want_l),
                }
            )
    return rows


def correctness_large(pulled: Path, tmp: Path, tasks: list[str]) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from storage.pulled import PulledVersion
    from storage.runtime import BundleRuntime

    with BundleRuntime.open(pulled) as rt:
        exact = 0
        for task in tasks:
            out = PulledVersion(pulled).materialize(task, tmp / f"exact-{task}")
            want = load_file(str(out / "model.safetensors"))
            got = rt.state_dict(task)
            exact += want.keys() == got.keys() and all(
                torch.equal(got[n], w) for n, w in want.items()
            )
            del want, got
            shutil.rmtree(out)
        model = rt.model(tasks[0])
        for task in tasks[1:]:
            rt.switch(model, task)
        want_sd = rt.state_dict(tasks[-1])
        switched = all(torch.equal(v, want_sd[k]) for k, v in model.state_dict().items())
        del want_sd
        ids = _ids(len(tasks))
        with torch.no_grad():
            mixed = rt.mixed(tasks)
            got_l = mixed(tasks, input_ids=ids).logits
            del mixed
            want_l = []
            for i, task in enumerate(tasks):
                rt.switch(model, task)
                want_l.append(model(input_ids=ids[i : i + 1]).logits)
        return {
            "exact": f"{exact}/{len(tasks)}",
            "switched": switched,
            "mixed_rel": _rel(got_l, torch.cat(want_l)),
        }


def _ids(rows: int, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 1000, (rows, SEQ), generator=g)


# ---------------------------------------------------------------------------- 2. switch
def switch_times(pulled: Path, tmp: Path, tasks: list[str], repeats: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2ForSequenceClassification

    from storage.pulled import PulledVersion
    from storage.runtime import BundleRuntime

    with BundleRuntime.open(pulled) as rt:
        model = rt.model(tasks[0])
        first = []  # a task's first switch: it draws and keeps its sign streams first
        for task in tasks[2:]:
            t0 = time.perf_counter()
            rt.switch(model, task)
            first.append(time.perf_counter() - t0)
        ready = PulledVersion(pulled).materialize(tasks[1], tmp / "ready")
        weights = str(ready / "model.safetensors")
        load_file(weights)  # warm the page cache
        counter = [0]

        def switch() -> None:
            counter[0] += 1
            rt.switch(model, tasks[counter[0] % 2])

        def warm_reload() -> None:
            model.load_state_dict(load_file(weights))

        def pretrained() -> None:
            GPT2ForSequenceClassification.from_pretrained(ready)

        def materialize_load() -> None:
            dest = tmp / "fresh"
            shutil.rmtree(dest, ignore_errors=True)
            PulledVersion(pulled).materialize(tasks[counter[0] % 2], dest)
            model.load_state_dict(load_file(str(dest / "model.safetensors")))

        methods: dict[str, Callable[[], None]] = {
            "rt.switch": switch,
            "warm load_file + load_state_dict": warm_reload,
            "from_pretrained": pretrained,
            "materialize + load_file + load_state_dict": materialize_load,
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        cpu: dict[str, list[float]] = {k: [] for k in methods}
        process: dict[str, list[float]] = {k: [] for k in methods}
        for rep in range(repeats + 1):
            for name, fn in methods.items():
                t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                fn()
                if rep:  # the first round is the warm-up
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.thread_time() - c0)
                    process[name].append(time.process_time() - p0)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        out: dict[str, Any] = {
            "median": {k: _median(v) for k, v in times.items()},
            # CPU time of the calling thread (1 torch thread): what the machine's load
            # does not inflate, read next to the wall-clock medians
            "cpu": {k: _median(v) for k, v in cpu.items()},
            # every thread of the process: a switch also runs a sign-stream thread and a
            # second compute thread (randes.retrieve.FUSED_THREADS)
            "process_cpu": {k: _median(v) for k, v in process.items()},
            "all": times,
            "first_switch": _median(first) if first else None,
            "nbytes": nbytes,
            "resident": rt.resident_bytes,
        }
        shutil.rmtree(ready, ignore_errors=True)
        if torch.cuda.is_available():
            out["cuda"] = _cuda_switch(pulled, tasks, repeats)
        return out


def _cuda_switch(pulled: Path, tasks: list[str], repeats: int) -> dict[str, float]:
    import torch

    from storage.runtime import BundleRuntime

    with BundleRuntime.open(pulled, device="cuda") as rt:
        model = rt.model(tasks[0])
        copy = {k: v.clone() for k, v in model.state_dict().items()}
        sw, cp = [], []
        for rep in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            rt.switch(model, tasks[rep % 2])
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(copy[k])
            torch.cuda.synchronize()
            if rep:
                sw.append(t1 - t0)
                cp.append(time.perf_counter() - t1)
        return {"switch": _median(sw), "d2d copy": _median(cp)}


# ---------------------------------------------------------------------------- 3. memory
def child(job: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh interpreter: one memory job, VmHWM read from /proc at the end."""
    import torch

    torch.set_num_threads(1)
    import transformers  # both sides pay the import

    ids = _ids(1)
    idle = _status()["VmRSS"]
    if job["kind"] == "from_pretrained":
        model = transformers.GPT2ForSequenceClassification.from_pretrained(job["dir"]).eval()
        with torch.no_grad():
            model(input_ids=ids)
    else:
        from storage.runtime import BundleRuntime

        with BundleRuntime.open(
            Path(job["dir"]), base_resident=job.get("resident", False)
        ) as rt:  # closed: its scratch (kept sign streams) is removed
            model = rt.model(rt.task_names[0])
            for _ in range(2):  # first switches (they draw and keep the streams), later ones
                for task in rt.task_names:
                    rt.switch(model, task)
            with torch.no_grad():
                model(input_ids=ids)
            return {"idle": idle, **_status()}
    return {"idle": idle, **_status()}


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def spawn(job: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.runtime_measure", json.dumps(job)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(pulled: dict[int, Path], tmp: Path, repeats: int) -> dict[str, Any]:
    from storage.pulled import PulledVersion

    ready = PulledVersion(pulled[min(pulled)]).materialize("t1", tmp / "mem-ready")
    jobs: dict[str, dict[str, Any]] = {
        "from_pretrained (1 task)": {"kind": "from_pretrained", "dir": str(ready)}
    }
    for n, path in sorted(pulled.items()):
        jobs[f"runtime, {n} task{'s' if n > 1 else ''}"] = {"kind": "runtime", "dir": str(path)}
    n = max(pulled)
    jobs[f"runtime, {n} tasks, base resident in the process"] = {
        "kind": "runtime",
        "dir": str(pulled[n]),
        "resident": True,
    }
    results: dict[str, list[dict[str, int]]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            results[name].append(spawn(job))
    shutil.rmtree(ready, ignore_errors=True)
    return {name: max(rs, key=lambda r: r["VmHWM"]) for name, rs in results.items()}


# ----------------------------------------------------------------------------- 4. mixed
def mixed_throughput(pulled: Path, tasks: list[str], repeats: int) -> list[dict[str, Any]]:
    import torch

    from storage.runtime import BundleRuntime

    rows = []
    with BundleRuntime.open(pulled) as rt, torch.no_grad():
        mixed = rt.mixed(tasks)
        model = rt.model(tasks[0])
        for per_task in (1, 8):
            ids = _ids(len(tasks) * per_task, seed=per_task)
            row_tasks = [t for t in tasks for _ in range(per_task)]

            def run_mixed(ids: Any = ids, row_tasks: list[str] = row_tasks) -> None:
                mixed(row_tasks, input_ids=ids)

            def run_switches(ids: Any = ids, per_task: int = per_task) -> None:
                for i, task in enumerate(tasks):
                    rt.switch(model, task)
                    model(input_ids=ids[i * per_task : (i + 1) * per_task])

            def run_passes(ids: Any = ids, per_task: int = per_task) -> None:
                for i in range(len(tasks)):
                    model(input_ids=ids[i * per_task : (i + 1) * per_task])

            def run_plain(ids: Any = ids) -> None:
                model(input_ids=ids)

            methods: dict[str, Callable[[], None]] = {
                "mixed model (one pass)": run_mixed,
                f"{len(tasks)} switches + {len(tasks)} per-task passes": run_switches,
                f"{len(tasks)} per-task passes, no switch (N resident models)": run_passes,
                "one plain model, one pass (floor)": run_plain,
            }
            times: dict[str, list[float]] = {k: [] for k in methods}
            for rep in range(repeats + 1):
                for name, fn in methods.items():
                    t0 = time.perf_counter()
                    fn()
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            rows.append(
                {
                    "rows": len(row_tasks),
                    "per_task": per_task,
                    "median": {k: _median(v) for k, v in times.items()},
                }
            )
        rows.append({"slot_bytes": mixed.slot_bytes, "per_task_bytes": mixed.per_task_bytes})
    return rows


if __name__ == "__main__":  # a memory job in a fresh interpreter (see spawn)
    print(json.dumps(child(json.loads(sys.argv[1]))))

"""Cost of a batch fold and of an ingest spread over a Dask cluster (issue 15, must-show 2-3).

Question answered: do K checkpoints folded as one batch (one pass over the master)
cost <= 0.35x the time of K sequential folds, with identical master bytes; and what
does an ingest of the same K through a 2-worker Dask LocalCluster cost against the
single-process batch fold on the same machine?

Method, on the embedded default (local store + SQLite, every run in a fresh RANDES_HOME
under one temp dir, inputs hot in the page cache, ``os.sync()`` before each timed run):

- the cost suite's GPT-2-shaped fp32 models (``small``: 6 layers, d=768, vocab 8192,
  ~50M parameters; the base plus K fine-tunes saved like
  ``GPT2ForSequenceClassification``, benchmarks.cost);
- ``sequential``: ``Workspace.fold`` once per checkpoint (K versions), as ingestion
  did before batches; ``batch``: ``storage.batch.fold_many`` of the K (one version);
  both draw the same seeds (``new_task_seed`` replaced by one fixed sequence), so their
  masters must be the same bytes (checked on every repeat);
- ``ingest``: the ingest flow (``run_validation=False``) on the same K, once with the
  single-process batch (``ingest-local``) and once with ``dask_address`` of a
  ``distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
  host="127.0.0.1")`` started beforehand (its start-up is reported apart);
- repeats interleaved (sequential, batch, ingest-local, ingest-dask, then again); medians.

    python -m benchmarks run cost --parts batch [--tasks 8] [--repeats 3] [--quick]

(the ``batch`` part of the cost suite, benchmarks.cost_suite; its first model only).
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.cost_models import ModelSpec, generate

Log = Callable[[str], None]


def _fold_each(ws: Any, items: list[Any]) -> list[Any]:
    """K sequential folds, one version each: what ingestion did before batches."""
    return [ws.fold("b", i.source, i.task) for i in items]


@contextmanager
def _seeds() -> Iterator[None]:
    """One fixed seed sequence for every fold path (so masters can be compared)."""
    import storage.batch
    import storage.folding

    counter = itertools.count(1)

    def seed() -> int:
        return next(counter) * 2_654_435_761

    saved = storage.folding.new_task_seed, storage.batch.new_task_seed
    storage.folding.new_task_seed = seed  # type: ignore[assignment]
    storage.batch.new_task_seed = seed  # type: ignore[assignment]
    try:
        yield
    finally:
        storage.folding.new_task_seed, storage.batch.new_task_seed = saved


@contextmanager
def _home(root: Path, base: Path) -> Iterator[Any]:
    """A fresh embedded workspace with the base registered and bundle ``b`` created."""
    from randes.config import TransformConfig
    from storage.settings import Settings
    from storage.workspace import Workspace

    shutil.rmtree(root, ignore_errors=True)
    os.environ["RANDES_HOME"] = str(root)
    with Workspace(Settings(home=root)) as ws:
        ws.init()
        ws.add_base("base", str(base))
        ws.create_bundle("b", "base", TransformConfig())
        yield ws
    shutil.rmtree(root, ignore_errors=True)


def _master(ws: Any) -> list[str]:
    _, manifest = ws.resolve("b")
    return [ref.sha256 for ref in manifest.superposition]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    os.sync()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(spec: ModelSpec, work: Path, tasks: int, repeats: int, log: Log) -> dict[str, Any]:
    """Time sequential folds, the batch fold and both ingests; see the module docstring."""
    from flows.prefect_session import prefect_session

    saved = os.environ.get("RANDES_HOME")
    try:
        with prefect_session():
            return _measure(spec, work, tasks, repeats, log)
    finally:
        if saved is None:
            os.environ.pop("RANDES_HOME", None)
        else:
            os.environ["RANDES_HOME"] = saved


def _measure(spec: ModelSpec, work: Path, tasks: int, repeats: int, log: Log) -> dict[str, Any]:
    import torch
    from distributed import LocalCluster

    from flows.pipeline import ingest_flow
    from storage.batch import BatchItem, fold_many

    torch.set_num_threads(1)  # the project's default (storage.settings.torch_threads)
    base, task_dirs = generate(spec, work / "models", tasks)
    incoming = work / "incoming"
    for k, path in enumerate(task_dirs, start=1):
        (incoming / f"task{k:02d}").mkdir(parents=True, exist_ok=True)
        os.link(path / "model.safetensors", incoming / f"task{k:02d}" / "model.safetensors")
    items = [BatchItem(str(incoming / f"task{k:02d}"), f"task{k:02d}") for k in range(1, tasks + 1)]
    times: dict[str, list[float]] = {
        n: [] for n in ("sequential", "batch", "ingest-local", "ingest-dask")
    }
    same: list[bool] = []
    load: list[float] = []
    # Workers read RANDES_HOME once, when they start: the Dask runs all use this home.
    dask_home = work / "ingest-dask"
    os.environ["RANDES_HOME"] = str(dask_home)
    _warm_up_prefect()
    start = time.perf_counter()
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )
    cluster_start_s = time.perf_counter() - start
    try:
        # The first task on a fresh worker imports torch, Prefect and the project
        # (minutes on a loaded 2-core machine): one untimed ingest warms both workers.
        with _seeds(), _home(dask_home, base):
            cold_s, _ = _timed(
                lambda: ingest_flow(
                    "b", str(incoming), run_validation=False, dask_address=cluster.scheduler_address
                )
            )
        log(f"cold ingest on fresh workers: {cold_s:.1f}s")
        for rep in range(repeats):
            load.append(os.getloadavg()[0])
            masters = {}
            with _seeds(), _home(work / "seq", base) as ws:
                t, _ = _timed(partial(_fold_each, ws, items))
                times["sequential"].append(t)
                masters["sequential"] = _master(ws)
            with _seeds(), _home(work / "batch", base) as ws:
                t, out = _timed(partial(fold_many, ws, "b", items))
                assert out.version == 1 and not out.refused, out
                times["batch"].append(t)
                masters["batch"] = _master(ws)
            for name, address in (
                ("ingest-local", None),
                ("ingest-dask", cluster.scheduler_address),
            ):
                with _seeds(), _home(work / name, base) as ws:
                    t, summary = _timed(
                        partial(
                            ingest_flow,
                            "b",
                            str(incoming),
                            run_validation=False,
                            dask_address=address,
                        )
                    )
                    assert summary["version"] == 1 and len(summary["folded"]) == tasks, summary
                    times[name].append(t)
                    masters[name] = _master(ws)
            same.append(len({tuple(m) for m in masters.values()}) == 1)
            log(f"repeat {rep + 1}: " + ", ".join(f"{n} {v[-1]:.1f}s" for n, v in times.items()))
    finally:
        cluster.close()
    medians = {n: statistics.median(v) for n, v in times.items()}
    return {
        "spec": spec.name,
        "params": spec.params(),
        "tasks": tasks,
        "repeats": repeats,
        "times_s": times,
        "median_s": medians,
        "batch_over_sequential": medians["batch"] / medians["sequential"],
        "dask_over_local_ingest": medians["ingest-dask"] / medians["ingest-local"],
        "identical_master_bytes": all(same),
        "cluster_start_s": cluster_start_s,
        "cold_dask_ingest_s": cold_s,
        "load_1min": load,
    }


def _warm_up_prefect() -> None:
    """Start Prefect's temporary API server before anything is timed."""
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> int:
        return 1

    warm_up()


def render(data: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    m = data["median_s"]
    return [
        f"K = {data['tasks']} checkpoints of the {data['params'] / 1e6:.0f}M-parameter "
        f"`{data['spec']}` model, medians of {data['repeats']} (1-min load "
        f"{min(data['load_1min']):.1f}-{max(data['load_1min']):.1f} at the repeats' starts):",
        "",
        "| run | median s | all runs s |",
        "|---|---|---|",
        *(f"| {n} | {m[n]:.1f} | {', '.join(f'{x:.1f}' for x in data['times_s'][n])} |" for n in m),
        "",
        f"- batch / sequential: **{data['batch_over_sequential']:.2f}x** (goal <= 0.35x); "
        f"identical master bytes on every repeat: {data['identical_master_bytes']}",
        f"- ingest on a 2-worker LocalCluster / ingest in one process: "
        f"**{data['dask_over_local_ingest']:.2f}x** on warm workers (not included: the "
        f"cluster's start-up, {data['cluster_start_s']:.0f} s, and the first ingest on fresh "
        f"workers, {data['cold_dask_ingest_s']:.0f} s, most of it importing torch and Prefect)",
    ]

"""Fork server and workers of the cost benchmark: every measured run is a fresh process.

Started by ``benchmarks.cost_measure.Server`` as ``python -m benchmarks.cost_worker``, with
``PYTHONPATH`` naming the checkout whose ``randes`` is measured (``--core``)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


class MemSampler:
    """Samples RssAnon / VmRSS of this process every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_anon = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._fh = open("/proc/self/status", "rb")  # noqa: SIM115 - closed in stop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        self._fh.seek(0)
        out = {}
        for line in self._fh.read().split(b"\n"):
            if line[:6] in (b"RssAno", b"RssFil", b"VmRSS:", b"VmHWM:"):
                key, value = line.split(b":", 1)
                out[key.decode()] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.sample()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_rss = max(self.peak_rss, s["VmRSS"])
            self._stop.wait(self.interval)

    def __enter__(self) -> MemSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        s = self.sample()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.hwm = s["VmHWM"]
        self._fh.close()


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    from randes.checkpoint import CheckpointReader
    from randes.config import TransformConfig
    from randes.fold import fold
    from randes.manifest import KeyMap
    from randes.materialize import materialize

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    op = job["op"]
    gc.collect()
    sampler = MemSampler()
    idle = sampler.sample()
    result: dict[str, Any] = {"op": op, "threads": torch.get_num_threads()}

    if op in ("fold", "profile"):

        def run() -> Any:
            parent = job["parent"]
            with (
                CheckpointReader.open(Path(job["base"])) as base,
                CheckpointReader.open(Path(job["checkpoint"])) as ckpt,
            ):
                par = CheckpointReader.from_files([Path(p) for p in parent]) if parent else None
                try:
                    return fold(
                        base=base,
                        checkpoint=ckpt,
                        parent=par,
                        seed=job["seed"],
                        config=TransformConfig.model_validate(job.get("config", {})),
                        out_dir=Path(job["out"]),
                    )
                finally:
                    if par is not None:
                        par.close()

        if op == "profile":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            res = run()
            prof.disable()
            result["wall"] = time.perf_counter() - t0
            result["profile"] = _categorize(pstats.Stats(prof))
        else:
            with sampler:
                t0 = time.perf_counter()
                res = run()
                result["wall"] = time.perf_counter() - t0
        result["superposition"] = [
            {"path": str(s.path), "tensors": s.tensors, "size": s.size, "sha256": s.sha256}
            for s in res.superposition
        ]
        result["private"] = [
            {"path": str(s.path), "tensors": s.tensors, "size": s.size, "sha256": s.sha256}
            for s in res.private
        ]
        result["key_map"] = res.key_map.model_dump()

    elif op == "materialize":
        with sampler:
            t0 = time.perf_counter()
            with (
                CheckpointReader.open(Path(job["base"])) as base,
                CheckpointReader.from_files([Path(p) for p in job["superposition"]]) as sup,
                CheckpointReader.from_files([Path(p) for p in job["private"]]) as priv,
            ):
                shards = materialize(
                    base=base,
                    superposition=sup,
                    private=priv,
                    seed=job["seed"],
                    key_map=KeyMap(**job["key_map"]),
                    config=TransformConfig.model_validate(job.get("config", {})),
                    scale=0.4,
                    out_dir=Path(job["out"]),
                )
            result["wall"] = time.perf_counter() - t0
        result["written"] = sum(s.size for s in shards)
        result["sha256"] = ",".join(s.sha256 for s in shards)
        result["tensors"] = sorted(n for s in shards for n in s.tensors)

    elif op == "baseline":
        from safetensors.torch import load_file, save_file

        with sampler:
            t0 = time.perf_counter()
            # backend="pread": every byte really read into owned memory, like our reader
            # (the default mmap backend is lazy: bytes never touched are never read)
            loaded = [load_file(p, backend="pread") for p in job["inputs"]]
            outs = []
            for out in job["outputs"]:
                save_file({n: loaded[i][n] for i, n in out["tensors"]}, out["path"])
                outs.append(out["path"])
            result["wall"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for p in outs:
                fd = os.open(p, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            result["fsync"] = time.perf_counter() - t1
        result["read"] = sum(os.path.getsize(p) for p in job["inputs"])
        result["written"] = sum(os.path.getsize(p) for p in outs)
        del loaded
    else:
        raise ValueError(op)

    if op != "profile":
        result["idle_rss"] = idle["VmRSS"]
        result["idle_anon"] = idle["RssAnon"]
        result["peak_rss"] = sampler.hwm
        result["peak_anon"] = sampler.peak_anon
    return result


_CATEGORIES = (
    ("read", ("readinto",)),
    ("delta (sub)", ("'sub_' of", "'sub' of", "__sub__")),
    ("norm", ("vector_norm",)),
    ("flip (mul)", ("'mul_' of", "'mul' of")),
    ("+parent (add)", ("'add_' of", "'add' of", "__add__")),
    ("sha256", ("'update' of '_hashlib.HASH'",)),
    ("write", ("'write' of '_io",)),
    ("fsync", ("fsync",)),
    ("signs (shake256)", ("shake_256", "'digest' of '_hashlib")),
)


def _categorize(stats: Any) -> dict[str, float]:
    """Self time of every profiled function, bucketed by what it does."""
    out: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():
        label = f"{filename}:{func}"
        cat = "other"
        for name, needles in _CATEGORIES:
            if any(n in label for n in needles):
                cat = name
                break
        out[cat] = out.get(cat, 0.0) + tottime
    return out


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def serve() -> None:
    """Fork server: import everything once, then run each job in a forked child.

    A child of fork has its own address space whose high-water mark (VmHWM) starts at
    the RSS it inherits (interpreter + torch + randes, the same as a fresh process after
    its imports), so its peak is its own job's alone, without paying a 3-5 s torch import
    per run. Torch never ran an op here, so no thread pool is forked.
    """
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import randes.fold  # noqa: F401
    import randes.retrieve  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            out: dict[str, Any]
            try:
                out = {"ok": _worker(job)}
            except BaseException:  # noqa: BLE001 - reported to the driver
                import traceback

                out = {"error": traceback.format_exc()}
            with os.fdopen(w, "w") as fh:
                fh.write(json.dumps(out))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            data = fh.read()
        os.waitpid(pid, 0)
        sys.stdout.write((data or json.dumps({"error": "worker died"})) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()

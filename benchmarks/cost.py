"""Cost of fold and materialize: peak memory and wall time against a plain safetensors copy.

Question answered (issue requirement): on a GPT-2-shaped model of at least 40M
parameters with 8 tasks, does one fold stay under 1.2 GB peak RSS, without that peak
growing with the number of tasks or (beyond the largest tensor) with the model size,
and what do fold and materialize cost as a ratio to a plain safetensors read + write
of the same bytes, measured side by side in one run? Does fold time grow with the
number of tasks already folded?

Method:

- Two GPT-2-shaped fp32 models are generated on disk under a temp dir, tensor by
  tensor (never a whole model in memory): ``small`` (6 layers, d=768, vocab 8192,
  ~50M parameters) and ``large`` (12 layers, same widths, ~92M parameters). Both have
  the same largest tensor (``wte.weight``, 25 MB), so a streaming fold should show the
  same peak for both. Each has a base (bare GPT-2 names, as in the hub's ``gpt2``) and
  8 fine-tunes = base + small noise, saved like ``GPT2ForSequenceClassification``
  (``transformer.`` prefix, plus a ``score.weight`` head the base lacks).
- Tasks 1..8 are folded sequentially, each on the previous superposition, with the
  default TransformConfig, 3 times each with torch's default intra-op threads and 3
  times with one thread (all runs of a fold must give the same sha256). Every run is
  a FRESH process: a child forked from a server that imported torch and randes once
  (saves a 3-5 s import per run; the child's address space and high-water mark are
  its own). Peak RSS is the kernel's exact high-water mark ``VmHWM`` of that process
  (``ru_maxrss`` is not used: Linux carries the parent's high-water mark across
  fork/exec into it); anonymous memory (``RssAnon``, the process's own heap) is
  sampled every 2 ms. The reader uses ``readinto`` rather than mmap, so input file
  pages are counted in neither; the file-backed part of RSS is the interpreter's and
  torch's shared libraries. The fixed cost of the interpreter + torch + randes,
  measured in the same process just before the fold, is reported as ``idle``;
  ``own`` = peak - idle.
- Baseline, interleaved with every fold and materialize run, in its own fresh
  process: ``safetensors.torch.load_file(backend="pread")`` (every byte really read;
  the default mmap backend would skip bytes never touched) of every file the fold reads (base,
  checkpoint, parent superposition) and ``save_file`` of the same tensors' bytes the
  fold writes (superposition + private). Fold fsyncs what it writes (durability is a
  requirement); plain ``save_file`` does not, so the baseline is reported both
  ``plain`` and ``+fsync`` (its files fsynced after writing, timed separately). The
  parent calls ``os.sync()`` before every timed run so no run pays for the previous
  one's dirty pages. All inputs are hot in the page cache for both (24 GB RAM).
- Materialize of task 1 from the 8-task superposition, same protocol, against a
  baseline reading base + superposition + private and writing the model's bytes.
- One more fold (task 2, on the 1-task superposition) per size runs under cProfile
  to split its time into reading, hashing, writing + fsync, RNG and tensor math.

    .venv/bin/python benchmarks/cost.py                # full run (~5 min on 2 cores)
    .venv/bin/python benchmarks/cost.py --gpt2-small   # + real GPT-2 small (~10 min)
    .venv/bin/python benchmarks/cost.py --quick        # smaller models, 3 tasks (~1.5 min)

``--write-docs`` replaces the ``## Cost`` section at the end of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 1_000_000
GB = 1_000_000_000
TARGET_RSS = 1.2 * GB
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Cost"


# ---------------------------------------------------------------------------------------
# Model shapes and generation (parent process only, one tensor at a time)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    d: int
    vocab: int
    ctx: int
    labels: int = 2

    def base_tensors(self) -> dict[str, tuple[int, ...]]:
        """GPT-2 names and shapes (Conv1D weights are (in, out), as in transformers)."""
        d = self.d
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab, d),
            "wpe.weight": (self.ctx, d),
            "ln_f.weight": (d,),
            "ln_f.bias": (d,),
        }
        for i in range(self.layers):
            p = f"h.{i}."
            shapes |= {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        return shapes

    def params(self) -> int:
        return sum(_numel(s) for s in self.base_tensors().values())

    def largest_bytes(self) -> int:
        return 4 * max(_numel(s) for s in self.base_tensors().values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


FULL = (
    ModelSpec("small", layers=6, d=768, vocab=8192, ctx=1024),
    ModelSpec("large", layers=12, d=768, vocab=8192, ctx=1024),
)
GPT2_SMALL = ModelSpec("gpt2-small", layers=12, d=768, vocab=50257, ctx=1024)
"""The real GPT-2 small shapes (124M parameters, wte 154 MB): ``--gpt2-small``."""
QUICK = (
    ModelSpec("small", layers=4, d=384, vocab=4096, ctx=512),
    ModelSpec("large", layers=8, d=384, vocab=4096, ctx=512),
)


def write_streaming(path: Path, shapes: dict[str, tuple[int, ...]], make: Any) -> int:
    """A standard fp32 safetensors file written one tensor at a time; returns its size.

    ``make(name)`` returns the tensor; the header is computed from ``shapes`` first.
    """
    import torch

    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in names:
        nbytes = 4 * _numel(shapes[n])
        header[n] = {
            "dtype": "F32",
            "shape": list(shapes[n]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for n in names:
            t = make(n)
            assert t.dtype == torch.float32 and tuple(t.shape) == shapes[n], n
            fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return path.stat().st_size


def generate(spec: ModelSpec, root: Path, tasks: int) -> tuple[Path, list[Path]]:
    """base.safetensors and task{k}/model.safetensors (fine-tunes) under ``root``."""
    import torch
    from safetensors import safe_open

    shapes = spec.base_tensors()
    base_path = root / "base" / "model.safetensors"

    def base_tensor(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash_name(name))
        if len(shapes[name]) == 1:
            return (
                torch.ones(shapes[name]) if name.endswith("weight") else torch.zeros(shapes[name])
            )
        return torch.randn(shapes[name], generator=g).mul_(0.02)

    write_streaming(base_path, shapes, base_tensor)
    task_paths = []
    prefix = "transformer."
    with safe_open(str(base_path), framework="pt") as base:
        for k in range(1, tasks + 1):
            tuned_shapes = {prefix + n: s for n, s in shapes.items()}
            tuned_shapes["score.weight"] = (spec.labels, spec.d)
            g = torch.Generator().manual_seed(1000 + k)

            def tuned(name: str, g: torch.Generator = g) -> torch.Tensor:
                if name == "score.weight":
                    return torch.randn((spec.labels, spec.d), generator=g).mul_(0.02)
                t = base.get_tensor(name[len(prefix) :]).clone()
                return t.add_(torch.randn(t.shape, generator=g), alpha=1e-3)

            path = root / f"task{k}" / "model.safetensors"
            write_streaming(path, tuned_shapes, tuned)
            task_paths.append(path.parent)
    return base_path, task_paths


def hash_name(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")


# ---------------------------------------------------------------------------------------
# Workers (each run in a fresh interpreter)
# ---------------------------------------------------------------------------------------


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
    from randes.retrieve import materialize

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


class Server:
    def __init__(self, core: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--core", str(core)],
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


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / MB:.0f}"


def _slope(ks: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys against ks."""
    mk, my = statistics.fmean(ks), statistics.fmean(ys)
    den = sum((k - mk) ** 2 for k in ks)
    return sum((k - mk) * (y - my) for k, y in zip(ks, ys, strict=True)) / den if den else 0.0


def _select(res: dict[str, Any], what: str, **kw: Any) -> list[dict[str, Any]]:
    out = [r for r in res["runs"] if r["what"] == what]
    for key, value in kw.items():
        out = [r for r in out if (value(r[key]) if callable(value) else r[key] == value)]
    return out


def report(results: list[dict[str, Any]], repeats: int) -> tuple[str, list[str]]:
    lines: list[str] = []
    verdicts: list[str] = []
    add = lines.append
    tasks = results[0]["tasks"]
    ks = list(range(1, tasks + 1))
    default_threads = results[0]["runs"][0]["threads"]
    thread_modes = (("default", lambda t: t == default_threads), ("1 thread", lambda t: t == 1))
    if default_threads == 1:
        thread_modes = thread_modes[:1]

    folds_all = [r for res in results for r in _select(res, "fold")]
    idle = max(r["idle_rss"] for r in folds_all)
    libs = statistics.median(r["peak_rss"] - r["peak_anon"] for r in folds_all)
    bl_peaks = ", ".join(
        f"{_mb(max(b['peak_rss'] for b in _select(res, 'fold baseline')))} MB ({res['spec'].name})"
        for res in results
    )
    add("**Reading the numbers**\n")
    add(
        f"- Memory. The 1.2 GB target is held to the total peak RSS (VmHWM) of the fold's "
        f"process, the strictest number: it includes the ~{_mb(idle)} MB any process with "
        "torch imported pays before doing anything. The reader fills owned tensors with "
        "`readinto` (no mmap), so no page of the input files is mapped into the process: "
        "RSS holds no page cache of the checkpoints, and its file-backed part "
        f"(RSS - anon, ~{_mb(libs)} MB) is the shared libraries. The page cache the kernel "
        "keeps for the files read and written belongs to no process and is reclaimable. "
        "The anonymous peak (the process's own heap) is shown too; it is the same story. "
        f"The baseline holds whole files (`load_file`/`save_file`): {bl_peaks}."
    )
    add(
        "- Time. Inputs are hot in the page cache for both sides (24 GiB RAM), and "
        "`os.sync()` runs before every timed run. Fold also sha256-hashes every byte it "
        "writes (content addresses) and fsyncs its shards (durability); a plain `save_file` "
        "does neither, hence the `+fsync` baseline (fsync only, no hash)."
    )
    add(
        "- Threads. `default` = torch's default intra-op thread count (2 here). On this "
        "shared, busy 2-core VM every parallel torch op waits for a descheduled OpenMP "
        "thread, which makes the elementwise math ~10x slower than with 1 thread (see the "
        "profile). That math is memory-bound and small (under 10% of a fold with 1 thread), "
        "so one thread loses nothing where cores are idle and avoids the stall where they "
        "are not.\n"
    )
    add("### Models\n")
    add("| model | layers x d, vocab | parameters | checkpoint | superposition | largest tensor |")
    add("|---|---|---:|---:|---:|---:|")
    for res in results:
        s: ModelSpec = res["spec"]
        add(
            f"| {s.name} | {s.layers} x {s.d}, {s.vocab} | {res['params'] / 1e6:.1f}M "
            f"| {_mb(res['ckpt_bytes'])} MB | {_mb(res['sup_bytes'])} MB "
            f"| {_mb(res['largest'])} MB (wte) |"
        )

    add("\n### Peak memory of one fold, per task count k (fresh process each)\n")
    add(
        "MB (10^6 bytes), max over all runs of that k (default threads and 1 thread). "
        "`peak RSS` = VmHWM of the fold's process (what the 1.2 GB target is held to); "
        "`anon` = peak RssAnon (sampled every 2 ms): the process's own heap, without "
        "the shared libraries' file pages; `idle` = RSS of the same process just before "
        "the fold (interpreter + torch + randes imported); `own` = peak RSS - idle.\n"
    )
    header = "| model | " + " | ".join(f"k={k}" for k in ks)
    add(header + " | max |")
    add("|---|" + "---:|" * (tasks + 1))
    for res in results:
        name = res["spec"].name
        for label, fn in (
            ("peak RSS", lambda r: r["peak_rss"]),
            ("anon", lambda r: r["peak_anon"]),
            ("own", lambda r: r["peak_rss"] - r["idle_rss"]),
            ("idle", lambda r: r["idle_rss"]),
        ):
            vals = [max(fn(r) for r in _select(res, "fold", k=k)) for k in ks]
            bold = "**" if label == "peak RSS" else ""
            add(
                f"| {name} {label} | "
                + " | ".join(_mb(v) for v in vals)
                + f" | {bold}{_mb(max(vals))}{bold} |"
            )

    add(f"\n### Fold wall time per task count k (s, median of {repeats} runs per k and mode)\n")
    add(
        "k = the task being folded; fold k reads the superposition of tasks 1..k-1 (k=1 "
        "has no parent to read, so it is cheaper). Slope = least-squares fit over "
        "k=2..K of the medians; growth = slope x (K-2) as a share of the median fold.\n"
    )
    add(header + " | slope / task | growth k=2..K |")
    add("|---|" + "---:|" * (tasks + 2))
    for res in results:
        name = res["spec"].name
        for mode, pred in thread_modes:
            med = [median([r["wall"] for r in _select(res, "fold", k=k, threads=pred)]) for k in ks]
            slope = _slope(ks[1:], med[1:]) if tasks > 2 else 0.0
            growth = slope * (tasks - 2) / median(med[1:] or med)
            res.setdefault("slopes", {})[mode] = (slope, growth)
            add(
                f"| {name} fold, {mode} | "
                + " | ".join(f"{v:.2f}" for v in med)
                + f" | {slope * 1000:+.0f} ms | {100 * growth:+.0f}% |"
            )
        for label, fn in (
            ("baseline plain", lambda r: r["wall"]),
            ("baseline +fsync", lambda r: r["wall"] + r["fsync"]),
        ):
            med = [median([fn(r) for r in _select(res, "fold baseline", k=k)]) for k in ks]
            add(f"| {name} {label} | " + " | ".join(f"{v:.2f}" for v in med) + " | | |")
        for mode, pred in thread_modes:
            # each run over the baseline that ran right after it: shares its noise
            paired = [
                median(
                    [
                        f["wall"] / b["wall"]
                        for f in _select(res, "fold", k=k, threads=pred)
                        for b in _select(res, "fold baseline", k=k, rep=f["rep"])
                    ]
                )
                for k in ks
            ]
            slope = _slope(ks[1:], paired[1:]) if tasks > 2 else 0.0
            rel = slope * (tasks - 2) / median(paired[1:] or paired)
            add(
                f"| {name} ratio {mode} / plain (paired) | "
                + " | ".join(f"{v:.1f}x" for v in paired)
                + f" | {slope:+.2f}x | {100 * rel:+.0f}% |"
            )

    add("\n### Wall time against a plain safetensors read + write of the same bytes\n")
    add(
        "Medians over all runs (fold: k >= 2, reading base + checkpoint + parent "
        "superposition; materialize: task 1 out of the K-task superposition). Every run "
        "is followed by its baseline in the same loop. Ratio = ours / baseline.\n"
    )
    add(
        "| model | operation | threads | reads | writes | ours (s) | baseline plain (s) "
        "| ratio | baseline +fsync (s) | ratio | peak RSS ours | peak RSS baseline |"
    )
    add("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    min_k = 2 if tasks >= 2 else 1
    for res in results:
        name = res["spec"].name
        for op, what in (("fold (k>=2)", "fold"), ("materialize", "materialize")):
            bls = _select(res, f"{what} baseline", k=lambda k: k >= min_k)
            bp = median([b["wall"] for b in bls])
            bf = median([b["wall"] + b["fsync"] for b in bls])
            for mode, pred in thread_modes:
                ours = _select(res, what, k=lambda k: k >= min_k, threads=pred)
                o = median([x["wall"] for x in ours])
                res.setdefault("ratios", {})[f"{what}, {mode}"] = (o / bp, o / bf)
                add(
                    f"| {name} | {op} | {mode} ({ours[0]['threads']}) "
                    f"| {_mb(bls[0]['read'])} MB | {_mb(bls[0]['written'])} MB "
                    f"| {o:.2f} | {bp:.2f} | **{o / bp:.1f}x** | {bf:.2f} | **{o / bf:.1f}x** "
                    f"| {_mb(max(x['peak_rss'] for x in ours))} MB "
                    f"| {_mb(max(b['peak_rss'] for b in bls))} MB |"
                )

    if results[0]["profiles"]:
        add("\n### Where fold time goes (fold of task 2 on a 1-task superposition, cProfile)\n")
        add(
            "Self time of the calls doing each job (torch ops by name, `readinto`, "
            "`sha256.update`, file `write`, `fsync`); one run each, so noisy.\n"
        )
        order = [name for name, _ in _CATEGORIES] + ["other"]
        cats = [
            c
            for c in order
            if any(c in p["profile"] for r in results for p in r["profiles"].values())
        ]
        add("| model | threads | " + " | ".join(cats) + " | wall |")
        add("|---|---|" + "---:|" * (len(cats) + 1))
        for res in results:
            for mode, prof in res["profiles"].items():
                p = prof["profile"]
                tot = sum(p.values())
                add(
                    f"| {res['spec'].name} | {mode} | "
                    + " | ".join(
                        f"{p.get(c, 0):.2f}s ({100 * p.get(c, 0) / tot:.0f}%)" for c in cats
                    )
                    + f" | {prof['wall']:.2f}s |"
                )

    # verdicts
    folds = [r for res in results for r in _select(res, "fold")]
    peak = max(r["peak_rss"] for r in folds)
    verdicts.append(
        f"Peak RSS of one fold < 1.2 GB: {'PASS' if peak < TARGET_RSS else 'FAIL'} "
        f"(max {_mb(peak)} MB over all {len(folds)} folds of both models; "
        f"max anonymous {_mb(max(r['peak_anon'] for r in folds))} MB)."
    )
    for res in results:
        peaks = [max(r["peak_rss"] for r in _select(res, "fold", k=k)) for k in ks]
        spread = max(peaks) - min(peaks)
        verdicts.append(
            f"Peak RSS flat in k ({res['spec'].name}): "
            f"{'PASS' if spread < 0.05 * max(peaks) else 'FAIL'} "
            f"({_mb(min(peaks))}..{_mb(max(peaks))} MB for k=1..{tasks})."
        )
    if len(results) >= 2:
        small, large = results[0], results[1]
        own_s = max(r["peak_rss"] - r["idle_rss"] for r in _select(small, "fold"))
        own_l = max(r["peak_rss"] - r["idle_rss"] for r in _select(large, "fold"))
        growth = own_l - own_s
        allowed = large["largest"] - small["largest"] + 0.1 * own_s + 10 * MB
        verdicts.append(
            f"Peak RSS flat in model size: {'PASS' if growth <= allowed else 'FAIL'} "
            f"(fold's own memory {_mb(own_s)} MB -> {_mb(own_l)} MB for "
            f"{small['params'] / 1e6:.0f}M -> {large['params'] / 1e6:.0f}M parameters with "
            f"the same largest tensor ({_mb(large['largest'])} MB); superposition "
            f"{_mb(small['sup_bytes'])} -> {_mb(large['sup_bytes'])} MB)."
        )
    parts = []
    for res in results:
        own = max(r["peak_rss"] - r["idle_rss"] for r in _select(res, "fold"))
        parts.append(
            f"{res['spec'].name} {_mb(own)} MB = {own / res['largest']:.1f} x its largest "
            f"tensor ({_mb(res['largest'])} MB)"
        )
    verdicts.append(
        "What a fold holds beyond the interpreter: " + "; ".join(parts) + " (the checkpoint "
        "tensor turned into the delta, the base tensor, the parent slot)."
    )
    for res in results:
        parts = []
        ok = True
        for mode, (slope, growth) in res.get("slopes", {}).items():
            ok = ok and growth < 0.10  # a negative slope is noise, not growth
            parts.append(
                f"{mode}: {slope * 1000:+.0f} ms per task, {100 * growth:+.0f}% over k=2..{tasks}"
            )
        verdicts.append(
            f"Fold time flat in k ({res['spec'].name}): "
            f"{'PASS' if ok else 'CHECK (noise or growth)'} ({'; '.join(parts)})."
        )
    for res in results:
        parts = [
            f"{key} {rp:.1f}x plain / {rf:.1f}x +fsync" for key, (rp, rf) in res["ratios"].items()
        ]
        verdicts.append(f"Time ratios ({res['spec'].name}): " + "; ".join(parts) + ".")
    return "\n".join(lines), verdicts


def machine() -> str:
    import psutil
    import torch

    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()}-core CPU VM ({platform.processor() or platform.machine()}), "
        f"{mem:.0f} GiB RAM, torch {torch.__version__.split('+')[0]} CPU, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def write_docs(section: str) -> None:
    """Replace (or append) the ``## Cost`` section of docs/benchmarks.md, nothing else."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    start = text.find("\n" + SECTION + "\n")
    if start == -1 and text.startswith(SECTION + "\n"):
        start = 0
    if start == -1:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        start += 1 if text[start] == "\n" else 0
        nxt = text.find("\n## ", start + len(SECTION))
        tail = "" if nxt == -1 else text[nxt:]
        new = text[:start] + section.rstrip("\n") + "\n" + tail
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models, 3 tasks")
    ap.add_argument(
        "--gpt2-small",
        action="store_true",
        help="also the real GPT-2 small shapes (124M parameters, vocab 50257)",
    )
    ap.add_argument("--tasks", type=int, default=None, help="tasks folded (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per fold k / materialize")
    ap.add_argument("--tmp", default=None, help="parent dir of the temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--json", default=None, help="also dump raw results to this file")
    ap.add_argument(
        "--core", default=str(ROOT), help="checkout whose randes/ is measured (default: this one)"
    )
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.core).resolve()))
    if args.serve:
        serve()
        return

    specs = (QUICK if args.quick else FULL) + ((GPT2_SMALL,) if args.gpt2_small else ())
    tasks = args.tasks or (3 if args.quick else 8)
    tmp = Path(tempfile.mkdtemp(prefix="randes-cost-", dir=args.tmp))
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log(f"working in {tmp}")
    global _SERVER
    _SERVER = Server(Path(args.core))
    try:
        results = []
        for spec in specs:
            results.append(run_size(spec, tmp / spec.name, tasks, args.repeats, log))
            if not args.keep:
                shutil.rmtree(tmp / spec.name)
    finally:
        _SERVER.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.perf_counter() - t0
    tables, verdicts = report(results, args.repeats)
    cmd = "python benchmarks/cost.py" + (" --quick" if args.quick else "")
    shown = []
    argv = sys.argv[1:]
    for i, a in enumerate(argv):  # options that do not change what is measured are left out
        if a in ("--quick", "--write-docs", "--keep") or a.startswith(("--json", "--tmp")):
            continue
        if i and argv[i - 1] in ("--json", "--tmp"):
            continue
        shown.append(a)
    if shown:
        cmd += " " + " ".join(shown)
    section = "\n".join(
        [
            SECTION,
            "",
            f"Run {args.date} on {machine()}; whole run {elapsed / 60:.1f} min; load average "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other sessions "
            "share these 2 cores: single runs are noisy, hence medians and paired ratios).",
            "",
            f"    .venv/bin/{cmd}",
            "",
            "Method: see the docstring of `benchmarks/cost.py` (fresh process per fold, "
            "GPT-2-shaped fp32 models, default TransformConfig, baseline = "
            '`safetensors.torch.load_file(backend="pread")` of every file the operation '
            "reads + `save_file` of as many bytes as it writes, interleaved run by run).",
            "",
            "**Verdicts**",
            "",
            *[f"- {v}" for v in verdicts],
            "",
            tables,
            "",
        ]
    )
    print(section)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {k: v for k, v in r.items() if k != "spec"} | {"spec": r["spec"].__dict__}
                    for r in results
                ],
                indent=1,
            )
        )
    if args.write_docs:
        write_docs(section)
        log(f"wrote {SECTION!r} to {DOCS}")


if __name__ == "__main__":
    main()

"""Building blocks of the storage-axis quality benchmark (benchmarks.quality_storage).

Suite-agnostic: a suite is a base dir, fine-tuned task dirs (backbone + private head),
reference accuracies and ``accuracy(task, state, split)``. Everything here is stored
in memory after one real ``randes.fold`` per task, and every retrieved model comes from
``randes.retrieve`` over in-memory readers, with the superposition's slots replaced by
what a serving artifact of a given format decodes to (``randes.quantize.fake_quantize``,
or a bf16 round trip). Byte counts are tensor payloads only (safetensors headers and
manifests excluded): ``QuantScheme.nbytes`` for the quantized formats.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from randes.checkpoint import CheckpointReader, TensorMeta
from randes.config import TransformConfig
from randes.fold import fold, l2_norm, layout_of
from randes.manifest import KeyMap
from randes.quantize import QuantScheme, fake_quantize
from randes.retrieve import DEFAULT_SCALE_KEY, retrieve
from randes.scaling import (
    data_free_scale,
    data_free_tensor_scales,
    noise_gain,
    relative_interference,
)

Scale = float | Mapping[str, float]
State = dict[str, Tensor]


# --------------------------------------------------------------------------- suites


@dataclass
class StorageSuite:
    """What the benchmark needs of a model suite; adapters live in benchmarks.storage_suites."""

    name: str
    description: str
    base_dir: Path
    task_dirs: dict[str, Path]
    ref: dict[str, dict[str, float]]  # split -> task -> fine-tuned accuracy
    accuracy: Callable[[str, Mapping[str, Tensor], str], float]
    seeds: dict[str, int]  # task -> RanDeS seed (fixed: reproducible bundles)
    notes: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return list(self.task_dirs)


class MemoryReader:
    """The read side of a CheckpointReader over tensors in memory (each get is a copy).

    randes.retrieve only calls keys / metas / meta / get / iteration, so this stands in
    for a reader of a (fake-quantized) superposition without writing it to disk.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def metas(self) -> dict[str, TensorMeta]:
        return {n: self.meta(n) for n in self.tensors}

    def meta(self, name: str) -> TensorMeta:
        t = self.tensors[name]
        return TensorMeta(t.dtype, tuple(t.shape))

    def get(self, name: str) -> Tensor:
        return self.tensors[name].clone()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def read_all(reader: CheckpointReader | MemoryReader) -> State:
    return {n: reader.get(n) for n in reader}


def nbytes(tensors: Mapping[str, Tensor]) -> int:
    """Payload bytes of tensors as stored (no header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """How a superposition (or a merged delta) is stored for serving."""

    name: str
    scheme: QuantScheme | None = None
    dtype: torch.dtype = torch.float32

    def nbytes(self, shape: tuple[int, ...]) -> int:
        if self.scheme is not None:
            return self.scheme.nbytes(shape)
        return math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()

    def apply(self, x: Tensor) -> Tensor:
        """What a reader of this format gets back, as float32."""
        if self.scheme is not None:
            return fake_quantize(x, self.scheme)
        return x.to(self.dtype).to(torch.float32)

    def bits(self, shape: tuple[int, ...]) -> float:
        return 8 * self.nbytes(shape) / math.prod(shape)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32"),
        Format("bf16", dtype=torch.bfloat16),
        Format("int8-row", QuantScheme(bits=8, group_size=None)),
        Format("int8-g64", QuantScheme(bits=8, group_size=64)),
        Format("int4-row", QuantScheme(bits=4, group_size=None)),
        Format("int4-g64", QuantScheme(bits=4, group_size=64)),
        Format("int4-g128", QuantScheme(bits=4, group_size=128)),
        Format("int3-g64", QuantScheme(bits=3, group_size=64)),
    )
}
SERVING = "int4-g64"
"""The project's default serving format (QuantScheme() = int4, groups of 64)."""
assert FORMATS[SERVING].scheme == QuantScheme()


# --------------------------------------------------------------------------- models


@dataclass
class Models:
    """Base and fine-tunes of a suite in memory, with the layout of a TransformConfig."""

    suite: StorageSuite
    config: TransformConfig
    base: State
    tuned: dict[str, State]
    key_maps: dict[str, KeyMap]
    superposed: tuple[str, ...]
    base_norms: dict[str, float]

    @property
    def base_bytes(self) -> int:
        return nbytes(self.base)

    def extras(self, task: str) -> State:
        """Tensors of the fine-tune the base lacks (its head)."""
        covered = {self.key_maps[task].to_checkpoint(n) for n in self.base}
        return {n: t for n, t in self.tuned[task].items() if n not in covered}


def load_models(suite: StorageSuite, config: TransformConfig, folded: Folded) -> Models:
    with CheckpointReader.open(suite.base_dir) as base:
        layout = layout_of(base, config)
        state = read_all(base)
    tuned = {}
    for t, d in suite.task_dirs.items():
        with CheckpointReader.open(d) as ck:
            tuned[t] = read_all(ck)
    norms = {n: l2_norm(state[n].to(torch.float32)) for n in layout.superposed}
    return Models(suite, config, state, tuned, folded.key_maps, layout.superposed, norms)


@dataclass
class Folded:
    """One bundle: tasks folded in order through randes.fold, kept in memory."""

    config: TransformConfig
    tasks: tuple[str, ...]
    seeds: dict[str, int]
    superposition: State  # the fp32 master
    private: dict[str, State]
    key_maps: dict[str, KeyMap]
    delta_norms: dict[str, dict[str, float]]
    fold_s: float = 0.0
    serving_diff: float | None = None
    """Max |fold's own serving copy, decoded - fake_quantize(master)| (None: no copy)."""

    def private_bytes(self) -> int:
        return sum(nbytes(p) for p in self.private.values())


def fold_bundle(
    suite: StorageSuite, tasks: Sequence[str], config: TransformConfig, work: Path
) -> Folded:
    """Fold ``tasks`` in order (parent = previous superposition) through randes.fold."""
    import time

    t0 = time.perf_counter()
    private: dict[str, State] = {}
    key_maps: dict[str, KeyMap] = {}
    norms: dict[str, dict[str, float]] = {}
    parent: CheckpointReader | None = None
    work.mkdir(parents=True, exist_ok=True)
    try:
        with CheckpointReader.open(suite.base_dir) as base:
            for i, task in enumerate(tasks):
                with CheckpointReader.open(suite.task_dirs[task]) as ck:
                    res = fold(
                        base=base,
                        checkpoint=ck,
                        parent=parent,
                        seed=suite.seeds[task],
                        config=config,
                        out_dir=work / f"v{i + 1:02d}",
                    )
                if parent is not None:
                    parent.close()
                parent = CheckpointReader.from_files([s.path for s in res.superposition])
                if res.private:
                    with CheckpointReader.from_files([s.path for s in res.private]) as pr:
                        private[task] = read_all(pr)
                else:
                    private[task] = {}
                key_maps[task] = res.key_map
                norms[task] = res.delta_norms
        assert parent is not None
        sup = {n: parent.get(n).to(torch.float32) for n in parent}
        serving_diff = _check_serving(res, config, sup)
    finally:
        if parent is not None:
            parent.close()
        shutil.rmtree(work, ignore_errors=True)
    seeds = {t: suite.seeds[t] for t in tasks}
    return Folded(
        config,
        tuple(tasks),
        seeds,
        sup,
        private,
        key_maps,
        norms,
        time.perf_counter() - t0,
        serving_diff,
    )


def _check_serving(res: object, config: TransformConfig, sup: State) -> float | None:
    """Compare the serving copy the fold wrote (randes.serving, when this version of the
    core writes one) with fake_quantize of the master: the benchmark's quantized formats
    stand for exactly what a served artifact decodes to."""
    shards = getattr(res, "serving", None)
    scheme = getattr(config, "serving", None)
    if not shards or scheme is None:
        return None
    from randes.checkpoint import TensorMeta as Meta
    from randes.serving import QuantizedReader

    metas = {n: Meta(torch.float32, tuple(t.shape)) for n, t in sup.items()}
    inner = CheckpointReader.from_files([s.path for s in shards])
    with QuantizedReader(inner, scheme, metas) as q:
        return max(float((q.get(n) - fake_quantize(x, scheme)).abs().max()) for n, x in sup.items())


# --------------------------------------------------------------------------- stores


def scale_key(scale: Scale) -> object:
    if isinstance(scale, Mapping):
        return tuple(sorted((k, round(float(v), 3)) for k, v in scale.items()))
    return round(float(scale), 3)


def rounded(scale: Scale) -> Scale:
    """Lambdas are used rounded to 3 decimals, so equal rules share one evaluation."""
    if isinstance(scale, Mapping):
        return {k: round(float(v), 3) for k, v in scale.items()}
    return round(float(scale), 3)


class Store:
    """One way of storing a suite's tasks: gives each task back at a scale, counts bytes."""

    key: tuple[object, ...]
    method: str
    fmt: str

    def state(self, task: str, scale: Scale) -> State:  # pragma: no cover - interface
        raise NotImplementedError

    def total_bytes(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError


class RandesGroup(Store):
    """A bundle group: each member a separately folded bundle, served in one format.

    A single bundle is a group of one. theta_t = base + lambda * T_t^-1(Q(S_member)).
    """

    def __init__(
        self, models: Models, members: Sequence[Folded], fmt: Format, label: str = ""
    ) -> None:
        self.models = models
        self.members = list(members)
        self.fmt = fmt.name
        self._format = fmt
        self.method = "RanDeS" if len(members) == 1 else f"RanDeS group of {len(members)}"
        self.key = ("randes", label, tuple(m.tasks for m in members), fmt.name)
        self.member_of = {t: m for m in members for t in m.tasks}
        self._quantized: dict[int, MemoryReader] = {}
        self._base = MemoryReader(models.base)

    def sup_reader(self, member: Folded) -> MemoryReader:
        i = self.members.index(member)
        if i not in self._quantized:
            self._quantized[i] = MemoryReader(
                {n: self._format.apply(x) for n, x in member.superposition.items()}
            )
        return self._quantized[i]

    def state(self, task: str, scale: Scale) -> State:
        m = self.member_of[task]
        sc: Scale = scale
        if isinstance(scale, Mapping) and DEFAULT_SCALE_KEY not in scale:
            sc = {**scale, DEFAULT_SCALE_KEY: 1.0}
        priv = m.private[task]
        return dict(
            retrieve(
                base=self._base,  # type: ignore[arg-type]
                superposition=self.sup_reader(m),  # type: ignore[arg-type]
                private=MemoryReader(priv) if priv else None,  # type: ignore[arg-type]
                seed=m.seeds[task],
                key_map=m.key_maps[task],
                config=m.config,
                scale=sc,
            )
        )

    def sup_bytes(self) -> int:
        shapes = [tuple(self.models.base[n].shape) for n in self.models.superposed]
        return sum(self._format.nbytes(s) for s in shapes)

    def private_bytes(self) -> int:
        return sum(m.private_bytes() for m in self.members)

    def total_bytes(self) -> int:
        return self.models.base_bytes + len(self.members) * self.sup_bytes() + self.private_bytes()

    # ---- lambda rules (data-free: from stored norms only)

    def interference(self, task: str) -> float:
        """r_t of the task in its member bundle (randes.scaling)."""
        m = self.member_of[task]
        return relative_interference(
            task, m.delta_norms, self.models.base_norms, self.models.superposed
        )

    def data_free(self, task: str, gain: float | None = None) -> float:
        """The data-free lambda; ``gain`` None: the gain of the member's sign map."""
        m = self.member_of[task]
        if gain is None:
            gain = noise_gain(m.config.map)
        return data_free_scale(
            task, m.delta_norms, self.models.base_norms, self.models.superposed, gain=gain
        )

    def data_free_tensors(self, task: str, gain: float | None = None) -> dict[str, float]:
        m = self.member_of[task]
        if gain is None:
            gain = noise_gain(m.config.map)
        return data_free_tensor_scales(
            task, m.delta_norms, self.models.base_norms, self.models.superposed, gain=gain
        )


class TaskArithmetic(Store):
    """theta_base + lambda * sum_t delta_t (one merged model), each task with its own head.

    fmt fp32: the merged model itself is stored (no base needed). Any other format: the
    base plus the merged delta in that format (absmax quantization is scale-equivariant,
    so Q(lambda * sum) = lambda * Q(sum) and one quantization serves every lambda).
    """

    def __init__(self, models: Models, fmt: Format) -> None:
        self.models = models
        self.fmt = fmt.name
        self._format = fmt
        self.method = "task arithmetic"
        self.key = ("ta", fmt.name)
        base = models.base
        self.delta: State = {}
        for n, w in base.items():
            if not w.dtype.is_floating_point:
                continue
            total = torch.zeros_like(w, dtype=torch.float32)
            for t in models.tuned:
                total += models.tuned[t][models.key_maps[t].to_checkpoint(n)].float() - w.float()
            self.delta[n] = total if fmt.name == "fp32" else fmt.apply(total)

    def state(self, task: str, scale: Scale) -> State:
        assert not isinstance(scale, Mapping)
        km = self.models.key_maps[task]
        out: State = {}
        for n, w in self.models.base.items():
            if n in self.delta:
                out[km.to_checkpoint(n)] = (w.float() + float(scale) * self.delta[n]).to(w.dtype)
            else:
                out[km.to_checkpoint(n)] = w.clone()
        out.update(self.models.extras(task))
        return out

    def total_bytes(self) -> int:
        heads = sum(nbytes(self.models.extras(t)) for t in self.models.tuned)
        if self.fmt == "fp32":
            return self.models.base_bytes + heads  # the merged model replaces the base
        stored = sum(self._format.nbytes(tuple(d.shape)) for d in self.delta.values())
        return self.models.base_bytes + stored + heads


class BitDelta(Store):
    """Per task and matrix: sign(delta) bits and one float32 scale (mean |delta|).

    The data-free BitDelta initialization (no scale distillation). Rank-1 / private
    tensors as in RanDeS (the fold's private tensors, verbatim), so only the superposed
    matrices are compressed. Tasks do not share anything, so there is no cross-talk and
    the data-free lambda is 1.
    """

    def __init__(self, models: Models, folded: Folded) -> None:
        self.models = models
        self.folded = folded
        self.fmt = "1 bit + scale"
        self.method = "BitDelta (data-free init)"
        self.key = ("bitdelta",)
        self.bits: dict[str, State] = {}
        for t in models.tuned:
            km = models.key_maps[t]
            out: State = {}
            for n in models.superposed:
                d = models.tuned[t][km.to_checkpoint(n)].float() - models.base[n].float()
                out[n] = torch.where(d >= 0, 1.0, -1.0) * d.abs().mean()
            self.bits[t] = out

    def state(self, task: str, scale: Scale) -> State:
        assert not isinstance(scale, Mapping)
        km = self.models.key_maps[task]
        priv = self.folded.private[task]
        out: State = {}
        for n, w in self.models.base.items():
            ck = km.to_checkpoint(n)
            if ck in priv:
                out[ck] = priv[ck].clone()
            elif n in self.bits[task]:
                out[ck] = (w.float() + float(scale) * self.bits[task][n]).to(w.dtype)
            else:
                out[ck] = w.clone()
        for n, t in priv.items():
            out.setdefault(n, t.clone())
        return out

    def total_bytes(self) -> int:
        per_task = sum(
            -(-self.models.base[n].numel() // 8) + 4 for n in self.models.superposed
        ) * len(self.models.tuned)
        return self.models.base_bytes + per_task + self.folded.private_bytes()


class Floor(Store):
    """The base with each task's own head and private tensors (lambda = 0 everywhere)."""

    def __init__(self, models: Models, folded: Folded) -> None:
        self.models = models
        self.folded = folded
        self.fmt = "-"
        self.method = "base + private tensors (floor)"
        self.key = ("floor",)

    def state(self, task: str, scale: Scale) -> State:
        km = self.models.key_maps[task]
        out = {km.to_checkpoint(n): w.clone() for n, w in self.models.base.items()}
        out.update({n: t.clone() for n, t in self.folded.private[task].items()})
        return out

    def total_bytes(self) -> int:
        return self.models.base_bytes + self.folded.private_bytes()

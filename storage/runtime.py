"""Serving a bundle version from memory: one resident superposition, any task on demand.

A deployment that materializes a task to disk and loads it with ``from_pretrained``
pays a model write + read per task switch, or N resident models for N tasks.
`BundleRuntime` holds the *serving* superposition (kept quantized as it was pulled; each
slot is dequantized only while one tensor is computed) and the base, and computes any
task from them in memory:

    rt = BundleRuntime.open("pulled-dir")          # or "bundle@production", device="cuda"
    model = rt.model("sentiment")                  # transformers model, no disk
    rt.switch(model, "topic")                      # same module, now the other task

Memory is the quantized superposition + the base + the working model the caller holds,
whatever the number of tasks. On the CPU the base is read from its verified files each
time a tensor is computed (`FileBaseReader`): its bytes stay in the page cache, shared
by every process on the machine and outside each one's RSS; the fused kernel
(randes.kernels) reads them through a mapping, a chunk at a time, dropping each chunk's
pages from the process after use. On a GPU it is resident on the device. Each
task's private tensors (its head, its norms under the default rank-1 policy) are read
from their verified files when needed.

Every tensor comes from `randes.retrieve.TaskRetrieval`, the very plan `materialize`
runs, over readers whose tensors are resident instead of on disk, with the same lambda
(`manifest_task_scale`) and the same `QuantizedReader`: ``state_dict(task)`` is bit for
bit what ``randes materialize`` writes, and stays so when retrieval changes. A switch
recomputes every tensor from base + superposition, so switching back and forth
accumulates no drift. On a GPU the resident tensors live on the device and the math
runs there; the random signs are drawn on the CPU and moved (randes.transforms).

Not thread-safe: one runtime serves one thread (or guard it with a lock).
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from randes import kernels
from randes.buffers import WorkBuffers
from randes.checkpoint import CheckpointReader
from randes.layout import superposition_metas
from randes.manifest import BundleManifest, TaskEntry
from randes.retrieve import FUSED_THREADS, TaskRetrieval
from randes.scaling import manifest_task_scale
from randes.serving import QuantizedReader
from randes.source import Closing, TensorSource
from randes.switch_program import SwitchProgram
from storage.file_maps import MappedCheckpointReader
from storage.registry import TaskNotFoundError
from storage.runtime_readers import FileBaseReader, ResidentReader
from storage.runtime_sources import BundleRuntimeError, RuntimeSource, open_source
from storage.settings import Settings
from storage.sign_files import DEFAULT_BUDGET, SignFiles

if TYPE_CHECKING:
    from storage.mixed import MixedBatchModel


@dataclass(frozen=True)
class TaskInfo:
    """One task a runtime serves: its name, seed, lambda and stored config.json (or None)."""

    name: str
    seed: int
    scale: float | Mapping[str, float]
    added_in_version: int
    config: dict[str, Any] | None


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BundleRuntimeError(f"device {device!r} asked for, but CUDA is not available")
    return dev


class BundleRuntime(Closing):
    """One bundle version served from memory (see the module docstring)."""

    def __init__(
        self,
        source: RuntimeSource,
        *,
        device: torch.device,
        master: bool,
        base_resident: bool | None = None,
        sign_budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.device = device
        self.manifest: BundleManifest = source.manifest
        self._source = source
        refs, quantized = source.served_refs(master=master)
        self.base: ResidentReader | FileBaseReader
        if base_resident if base_resident is not None else device.type != "cpu":
            with CheckpointReader.from_files(source.base_files()) as base_reader:
                self.base = ResidentReader.load(base_reader, device)
        else:
            self.base = FileBaseReader(source.base_files(), device)
        stored: ResidentReader | CheckpointReader
        if quantized and device.type == "cpu" and kernels.available():
            # The fused kernel reads a slot's codes once per switch: it reads them in
            # place from their verified files, like the base (page cache, not this
            # process's RSS, storage.file_maps), one slot's pages mapped at a time.
            stored = MappedCheckpointReader.from_files(source.files(refs))
        else:
            with CheckpointReader.from_files(source.files(refs)) as sup_reader:
                stored = ResidentReader.load(sup_reader, device, copies=not quantized)
        self._stored = stored
        """The superposition as stored: quantized codes + scales, or the master."""
        if device.type == "cpu" and kernels.available():
            for mapped in (self.base, stored):  # read in place by the kernel at each switch
                if isinstance(mapped, MappedCheckpointReader):
                    mapped.recache()  # small page-cache folios cost 5x the faults
        self.superposition: TensorSource = stored
        if quantized:
            assert self.manifest.serving is not None
            metas = superposition_metas(self.base, self.manifest.transform)
            self.superposition = QuantizedReader(stored, self.manifest.serving.scheme, metas)
        self.quantized = quantized
        if quantized and device.type == "cpu":
            kernels.warm()  # JIT now, while the process is small (see randes.kernels)
        self._private: dict[str, CheckpointReader | None] = {}
        self._plans: dict[str, TaskRetrieval] = {}
        self._programs: dict[str, SwitchProgram | None] = {}
        """Each task's compiled switch (randes.switch_program); None: it has none."""
        self._sign_files = SignFiles(sign_budget) if sign_budget and kernels.available() else None
        """The sign streams drawn for each task, kept for its next switches."""
        self._buffers = WorkBuffers()
        """Work buffers every task's retrieval reuses (a few chunks, any number of tasks)."""
        self._holding: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
        self.tasks: list[TaskInfo] = [
            TaskInfo(
                name=entry.name,
                seed=entry.seed,
                scale=manifest_task_scale(self.manifest, entry, self.base, source.base_norms),
                added_in_version=entry.added_in_version,
                config=self._read_config(entry),
            )
            for entry in self.manifest.tasks
        ]
        self._info = {t.name: t for t in self.tasks}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path_or_ref: str | Path,
        *,
        device: str | torch.device = "cpu",
        master: bool = False,
        base_resident: bool | None = None,
        settings: Settings | None = None,
        sign_budget: int = DEFAULT_BUDGET,
    ) -> BundleRuntime:
        """Serve a directory written by `randes pull`, or ``BUNDLE[@VERSION|@ALIAS]``
        read through the workspace's verified cache (``settings``, else the environment).

        ``master`` serves the fp32 master superposition instead of the quantized copy
        (a pulled directory must then come from ``pull --master``). ``base_resident``
        holds the base in the process (on ``device``) instead of reading it from its
        verified files, kept in the page cache, each time a tensor is computed; default:
        resident on a GPU, from the page cache on the CPU (same speed, and the base
        counts once per machine instead of once per process). ``sign_budget``: bytes of
        disk the elementwise sign streams drawn for the fused kernel may take in a
        private scratch directory, so that each task's are drawn once, not at every
        switch (one bit per parameter per task; 0: draw them every time;
        storage.sign_files).
        """
        dev = _device(device)
        source = open_source(path_or_ref, settings=settings)
        try:
            return cls(
                source,
                device=dev,
                master=master,
                base_resident=base_resident,
                sign_budget=sign_budget,
            )
        except BaseException:
            source.close()
            raise

    def close(self) -> None:
        for reader in self._private.values():
            if reader is not None:
                reader.close()
        self._private.clear()
        self._programs.clear()  # their addresses point into the readers closed below
        self._plans.clear()
        if self._sign_files is not None:
            self._sign_files.close()
        self.base.close()
        self._stored.close()
        self._source.close()

    # ------------------------------------------------------------------ queries
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def info(self, task: str) -> TaskInfo:
        try:
            return self._info[task]
        except KeyError:
            raise TaskNotFoundError(self.manifest.bundle, task) from None

    @property
    def resident_bytes(self) -> int:
        """Bytes the runtime holds: the superposition as stored (quantized or master)
        and the base, each when it is resident; of those read from their files, the
        small tensors held once read (storage.file_maps.LEND_MIN)."""
        held = 0
        for reader in (self.base, self._stored):
            if isinstance(reader, ResidentReader):
                held += reader.nbytes
            elif isinstance(reader, MappedCheckpointReader):
                held += reader.held_bytes
        return held

    def task_of(self, module: torch.nn.Module) -> str | None:
        """The task a module built or switched by this runtime holds (None if unknown)."""
        return self._holding.get(module)

    def entry(self, task: str) -> TaskEntry:
        self.info(task)
        return self.manifest.task(task)

    def plan(self, task: str) -> TaskRetrieval:
        """The retrieval plan of ``task`` over the resident readers (cached per task)."""
        plan = self._plans.get(task)
        if plan is None:
            entry = self.entry(task)
            plan = self._plans[task] = TaskRetrieval(
                base=self.base,
                superposition=self.superposition,
                private=self._private_reader(entry),
                seed=entry.seed,
                key_map=entry.key_map,
                config=self.manifest.transform,
                scale=self.info(task).scale,
                buffers=self._buffers,
                kept_signs=(
                    self._sign_files.task(self.task_names.index(task))
                    if self._sign_files is not None
                    else None
                ),
            )
        return plan

    def tensor(self, task: str, name: str) -> torch.Tensor:
        """One tensor of ``task`` (its fine-tune's name), on the runtime's device."""
        return self.plan(task).tensor(name).to(self.device)

    # ------------------------------------------------------------------ serving
    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """Every tensor of ``task`` under the fine-tune's names, on the runtime's device:
        bit for bit what `randes materialize` writes."""
        plan = self.plan(task)
        names = [spec.name for spec in plan.specs()]
        with self._mapped_pass():
            return {name: value.to(self.device) for name, value in plan.tensors(names)}

    def switch(self, module: torch.nn.Module, task: str) -> torch.nn.Module:
        """Turn ``module`` (holding any task of this bundle) into ``task`` in place.

        Names, shapes and dtypes are checked against the task's plan before any tensor
        is written; then each is recomputed from base + superposition and copied into
        the module's own storage (no second model allocated, no drift). Tensors the
        module ties to another (an ``lm_head`` sharing the embeddings) follow it.
        """
        plan = self.plan(task)
        specs = plan.specs()
        targets = module.state_dict(keep_vars=True)
        _check_targets(task, specs, targets)
        self._holding.pop(module, None)  # a failure below leaves it half switched
        outs = {spec.name: targets[spec.name].data for spec in specs}
        with torch.no_grad(), self._mapped_pass():
            left = self._run_program(task, plan, outs)
            for _ in plan.tensors(left, outs, lend=self.base.lend):
                pass  # each tensor is computed into the module's own storage
        self._holding[module] = task
        return module

    def _run_program(
        self, task: str, plan: TaskRetrieval, outs: Mapping[str, torch.Tensor]
    ) -> Sequence[str]:
        """Compute what ``task``'s compiled switch covers into ``outs``
        (randes.switch_program), when it has one that fits them; returns the names
        left to compute. A task gets its program at its first switch on the CPU (which
        draws and keeps its sign streams), or never (no kernel, no streams kept, over
        their budget: then every switch takes the plan's own path)."""
        if task not in self._programs and self.device.type == "cpu":
            self._programs[task] = SwitchProgram.build(plan, FUSED_THREADS)
        program = self._programs.get(task)
        if program is None or not program.fits(outs):
            return list(outs)
        self._buffers.streams.clear()  # a program reads kept streams in place: none lent
        program.run(outs)
        return program.rest

    @contextlib.contextmanager
    def _mapped_pass(self) -> Iterator[None]:
        """A pass over a task's tensors; at its end the pages of the files read in place
        that were left mapped for the next tensor are dropped (storage.file_maps)."""
        try:
            yield
        finally:
            if isinstance(self.superposition, QuantizedReader):
                self.superposition.release_held()
            for reader in (self.base, self._stored):
                if isinstance(reader, MappedCheckpointReader):
                    reader.flush_maps()

    def model(self, task: str) -> torch.nn.Module:
        """A transformers model of ``task`` built from its stored config.json, in eval
        mode on the runtime's device, weights computed in memory (no disk)."""
        config = self.info(task).config
        if config is None:
            raise BundleRuntimeError(
                f"task {task!r} has no stored config.json: load rt.state_dict(task) "
                "into your own module instead"
            )
        model = build_transformers_model(config, self.device, _float_dtype(self.plan(task)))
        return self.switch(model, task)

    def mixed(self, tasks: Sequence[str] | None = None) -> MixedBatchModel:
        """A model serving batches whose rows belong to different ``tasks`` (default:
        all) at once: see `storage.mixed`."""
        from storage.mixed import build_mixed

        return build_mixed(self, list(tasks) if tasks is not None else self.task_names)

    # ------------------------------------------------------------------ helpers
    def _private_reader(self, entry: TaskEntry) -> CheckpointReader | None:
        if entry.name not in self._private:
            self._private[entry.name] = self._source.private(entry)
        return self._private[entry.name]

    def _read_config(self, entry: TaskEntry) -> dict[str, Any] | None:
        ref = entry.files.get("config.json")
        if ref is None:
            return None
        path = self._source.side_file(ref)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BundleRuntimeError(
                f"task {entry.name!r}: unreadable config.json: {exc}"
            ) from None
        return data if isinstance(data, dict) else None


def _check_targets(task: str, specs: Iterable[Any], targets: Mapping[str, torch.Tensor]) -> None:
    want = {spec.name: spec for spec in specs}
    unknown = sorted(set(want) - set(targets))
    if unknown:
        raise BundleRuntimeError(
            f"task {task!r} has {len(unknown)} tensors the module lacks, e.g. {unknown[0]!r}"
        )
    for name, spec in want.items():
        target = targets[name]
        if tuple(target.shape) != tuple(spec.shape) or target.dtype != spec.dtype:
            raise BundleRuntimeError(
                f"task {task!r}: tensor {name!r} is {spec.dtype}{list(spec.shape)}, the module "
                f"holds {target.dtype}{list(target.shape)} (build it with rt.model({task!r}))"
            )
    filled = {_storage_ptr(targets[name]) for name in want}
    stale = sorted(n for n in targets if n not in want and _storage_ptr(targets[n]) not in filled)
    if stale:
        raise BundleRuntimeError(
            f"the module holds {len(stale)} tensors task {task!r} does not set, "
            f"e.g. {stale[0]!r}: they would keep another task's values"
        )


def _storage_ptr(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage().data_ptr())


def _float_dtype(plan: TaskRetrieval) -> torch.dtype | None:
    """The one float dtype of a task's tensors (None when they mix several)."""
    dtypes = {spec.dtype for spec in plan.specs() if spec.dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


def build_transformers_model(
    config: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """An uninitialized transformers model of the architecture ``config`` names.

    Weights are allocated but not initialized (the caller overwrites every one), so
    building costs an allocation, not a random init of the whole model.
    """
    try:
        import transformers
        from transformers.initialization import no_init_weights
    except ImportError:
        raise BundleRuntimeError(
            "rt.model needs transformers (pip install transformers); rt.state_dict works without it"
        ) from None
    data = dict(config)
    model_type = data.pop("model_type", None)
    architectures = data.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not isinstance(model_type, str) or cls is None:
        raise BundleRuntimeError(
            "config.json must name a model_type and a transformers architecture "
            f"(got {model_type!r}, {architectures!r})"
        )
    cfg = transformers.AutoConfig.for_model(model_type, **data)
    with no_init_weights(), torch.device(device):
        model = cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()

"""Getting one task back out of a superposition, streaming tensor by tensor.

    theta_t = theta_base + lambda * T_t^-1(S)

Each output tensor reads one base tensor and one superposition slot (or a private
tensor), so retrieval is one pass over base + superposition. Every output's name,
dtype and shape follow from the headers, so materialize plans its shards up front and
streams each tensor to disk as it is computed: about two of the largest tensors are in
memory at once, whatever the model size. Names are mapped back to
the fine-tune's own (``bert.`` prefix restored) so the result loads where the fine-tune
did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from randes import kernels
from randes.buffers import WorkBuffers
from randes.config import TransformConfig
from randes.errors import IncompatibleCheckpointError, RandesError
from randes.header import DTYPES
from randes.layout import check_superposition, layout_of
from randes.manifest import KeyMap
from randes.quantize import chunk_alignment as quant_alignment
from randes.retrieval_inputs import KeptSigns, MappedReader, RangeReader, RangeSource
from randes.serving import QuantizedReader
from randes.source import TensorMeta, TensorSource
from randes.threads import ProcessPool
from randes.transforms import TaskTransform
from randes.writer import TensorSpec

DEFAULT_SCALE_KEY = "*"
"""In a per-tensor scale dict, the lambda of tensors not named in it."""


def _scale_for(scale: float | Mapping[str, float], name: str) -> float:
    if not isinstance(scale, Mapping):
        return float(scale)
    if name in scale:
        return float(scale[name])
    if DEFAULT_SCALE_KEY in scale:
        return float(scale[DEFAULT_SCALE_KEY])
    raise ValueError(f"no scale for tensor {name!r} and no {DEFAULT_SCALE_KEY!r} default")


CHUNK_ELEMENTS = 1 << 19
"""Entries computed per step of a tensor's retrieval (2 MiB as float32, a core's L2):
large enough that each chunk's few torch ops cost little, small enough that a chunk's
passes (unpack, sign, convert, scale, add) stay in the CPU's cache instead of each
crossing memory."""


FUSED_CHUNK = 1 << 20
"""Entries per step of the fused kernel (4 MiB of float32): a base read into the output
is read a step at a time; a lent one (a mapping, a resident tensor) is computed in one
call that steps through it in compiled code. When every step was a Python call, a 124M
switch took 0.104 s with steps of 1M entries against 0.113 s with 256K and 0.140 s
with 64K, side by side in one process."""


FUSED_THREADS = 2
"""Threads computing one tensor by the fused kernel in `tensors` (each a half of it;
plus the thread drawing the signs ahead). 1: the calling thread alone."""

halves = ProcessPool(1, "randes")
"""The thread computing the second half of a tensor (FUSED_THREADS 2)."""
_sign_drawing = ProcessPool(1, "randes-signs")
"""The thread drawing (or reading back) the signs of the next tensors."""

SIGNS_AHEAD_MIN = 1 << 16
"""Tensors of fewer entries get their signs drawn where they are computed: handing a
small job to another thread (a wake-up and two GIL hand-overs, ~0.1 ms on a busy
2-core machine) costs more than drawing a few hundred bytes of stream."""

SIGNS_AHEAD = 1 << 26
"""Entries whose packed signs are drawn ahead of the tensor computed (8 MiB of stream
at most: the largest tensor's signs, the embeddings', are drawn while the tensors
before it are computed)."""


class _Retrieval:
    """One task's output tensors: all planned from the headers, each computed on demand."""

    def __init__(
        self,
        *,
        base: TensorSource,
        superposition: TensorSource | None,
        private: TensorSource | None,
        seed: int,
        key_map: KeyMap,
        config: TransformConfig,
        scale: float | Mapping[str, float],
        buffers: WorkBuffers | None = None,
        kept_signs: KeptSigns | None = None,
    ) -> None:
        layout = layout_of(base, config)
        self.buffers = buffers if buffers is not None else WorkBuffers()
        self.kept_signs = kept_signs
        """Where the elementwise sign streams drawn for the fused kernel are kept."""
        self._ranged = isinstance(superposition, RangeSource)  # checked once: it is slow
        self._base_ranges = isinstance(base, RangeReader)
        self._base_maps = isinstance(base, MappedReader)
        self._fused = isinstance(superposition, QuantizedReader) and kernels.available()
        if superposition is not None:
            check_superposition(base, superposition, layout)
        self.base = base
        self.superposition = superposition
        self.private = private
        self.scale = scale
        self.layout = layout
        self.transform = TaskTransform(layout, seed)
        private_names = set(private.keys()) if private is not None else set()
        absent = frozenset(key_map.absent)
        # checkpoint name -> (base name, or None for a private tensor; its meta)
        self.plan: dict[str, tuple[str | None, TensorMeta]] = {}
        for name in base.keys():  # noqa: SIM118 (a TensorSource need not be iterable)
            if name in absent:  # the fine-tune did not have it: neither does its copy
                continue
            ck_name = key_map.to_checkpoint(name)
            if private is not None and ck_name in private_names:
                self.plan[ck_name] = (None, private.meta(ck_name))
            elif name in layout.private_base:
                raise IncompatibleCheckpointError(
                    f"private tensor {ck_name!r} of this task is missing (rank1 policy 'private')"
                )
            else:
                meta = base.meta(name)
                own = key_map.dtype_name(name) if meta.is_float else None
                if own is not None:  # the fine-tune's dtype (bf16 over an fp32 base...)
                    if own not in DTYPES:
                        raise IncompatibleCheckpointError(f"unknown task dtype {own!r}")
                    meta = TensorMeta(dtype=DTYPES[own], shape=meta.shape)
                self.plan[ck_name] = (name, meta)
        for ck_name in sorted(private_names - set(self.plan)):
            self.plan[ck_name] = (None, private.meta(ck_name))  # type: ignore[union-attr]

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec.of(ck_name, meta) for ck_name, (_, meta) in self.plan.items()]

    def tensor(self, ck_name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Compute one output tensor: reads one base tensor and one slot (or a private one).

        theta + lambda * T^-1(slot), in the fine-tune's dtype; written into ``out`` (a
        tensor of the output's shape and dtype: a module's own parameter) and returned
        when given. From a quantized serving copy on the CPU this is the fused kernel
        (`randes.kernels`), a chunk of FUSED_CHUNK entries at a time: the base chunk is
        read straight into the output, then the dequantized codes, unflipped and times
        lambda, are added into it in one pass. Otherwise (CUDA, the fp32 master, no
        numba) the eager torch path `_torch_tensor`. Both give the same bits
        (tests/core/test_kernels.py).
        """
        return self._compute(ck_name, out, None, None)

    def tensors(
        self,
        names: Iterable[str],
        outs: Mapping[str, torch.Tensor] | None = None,
        lend: Callable[[str, torch.Tensor], AbstractContextManager[object]] | None = None,
        threads: int | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, `tensor`) for each of ``names`` in order, into ``outs[name]`` where
        given. The elementwise sign stream of the next tensor (SHAKE-256, a tenth to a
        third of the work) is drawn by a helper thread while this one computes: the
        kernel and the positional reads release the GIL. A large tensor's second half is
        computed by another thread, which may still be at it while this one computes the
        next tensor's first half: each tensor is yielded once it is complete. ``lend(base
        name, out)``, when given, wraps each torch-path computation (a runtime lends the
        base read to the module's storage, `storage.runtime_readers`)."""
        order = list(names)
        outs = outs or {}
        fused = [  # whose signs the helper thread draws ahead for the kernel
            n
            for n in order
            if self.fusable(n)
            and (n not in outs or outs[n].device.type == "cpu")
            and self._numel(n) >= SIGNS_AHEAD_MIN
        ]
        threads = FUSED_THREADS if threads is None else threads
        pool = _sign_drawing.get()
        helper = halves.get() if threads > 1 else None
        ahead: dict[str, Future[dict[str, Any]]] = {}
        # the tensor computed last, whose helper half may still run: yielded (and its
        # borrowed signs given back) once the next one's first half is computed
        done: _Computed | None = None
        try:
            queued = 0  # entries whose signs are drawn or being drawn, not yet used
            nxt = 0
            for ck_name in order:
                while nxt < len(fused) and (queued < SIGNS_AHEAD or not ahead):
                    ahead[fused[nxt]] = pool.submit(self._kernel_signs, fused[nxt])
                    queued += self._numel(fused[nxt])
                    nxt += 1
                future = ahead.pop(ck_name, None)
                if future is not None:
                    queued -= self._numel(ck_name)
                signs = future.result() if future is not None else None
                out = outs.get(ck_name)
                if done is not None and out is not None and _shares_storage(out, done.value):
                    tied, done = done, None  # one memory (tied weights): one at a time
                    yield tied.finish(self.buffers)
                later: list[Future[None]] = []
                value = self._compute(ck_name, out, signs, lend, helper, later)
                previous, done = done, _Computed(ck_name, value, signs, later)
                if previous is not None:
                    yield previous.finish(self.buffers)
            if done is not None:
                last, done = done, None
                yield last.finish(self.buffers)
        finally:  # a pass stopped early: its signs drawn ahead are not needed
            if done is not None:
                wait(done.later)
            for future in ahead.values():
                if future.cancel() or future.exception() is not None:
                    continue
                if "borrowed" in (left := future.result()):
                    self.buffers.streams.give_back(left["borrowed"])

    def _numel(self, ck_name: str) -> int:
        return math.prod(self.plan[ck_name][1].shape)

    # ------------------------------------------------------------------ internals
    def fusable(self, ck_name: str) -> bool:
        """Whether the kernel computes ``ck_name``: a float output from a float32 slot
        of a quantized copy (its codes' device is checked when they are read)."""
        name, meta = self.plan[ck_name]
        if not self._fused or name is None or name in self.layout.non_float:
            return False
        slot = self.transform.slot_of(name)
        assert self.superposition is not None
        return self.superposition.meta(slot).dtype == torch.float32 and meta.dtype.is_floating_point

    def _kernel_signs(self, ck_name: str) -> dict[str, Any]:
        """The signs of ``ck_name`` for the kernel: read back from `kept_signs` where
        kept, else drawn (and kept)."""
        name, meta = self.plan[ck_name]
        assert name is not None
        signs = self.transform.signs(name, meta.shape)
        if signs is None:
            return {}
        kept, pool = self.kept_signs, self.buffers.streams
        if kept is None or signs.kind != "elementwise" or not signs.numel:
            return signs.kernel_signs(pool)
        nbytes = -(-signs.numel // 8)
        buffer = pool.borrow(nbytes)
        if kept.read_into(ck_name, buffer[:nbytes]):
            return {"ebits": buffer[:nbytes], "borrowed": buffer}
        pool.give_back(buffer)
        drawn = signs.kernel_signs(pool)
        kept.keep(ck_name, drawn["ebits"])
        return drawn

    def _compute(
        self,
        ck_name: str,
        out: torch.Tensor | None,
        signs: dict[str, Any] | None,
        lend: Callable[[str, torch.Tensor], AbstractContextManager[object]] | None,
        helper: ThreadPoolExecutor | None = None,
        later: list[Future[None]] | None = None,
    ) -> torch.Tensor:
        fits = out is None or (out.device.type == "cpu" and out.is_contiguous())
        fused = fits and self.fusable(ck_name)
        value = self._fused_tensor(ck_name, out, signs, helper, later) if fused else None
        if value is not None:
            return value
        if out is None:
            return self._torch_tensor(ck_name)
        with lend(self.plan[ck_name][0] or "", out) if lend is not None else nullcontext():
            value = self._torch_tensor(ck_name)
        if value.data_ptr() != out.data_ptr():  # a lent base read is computed in place
            out.copy_(value)
        return out

    def _fused_tensor(
        self,
        ck_name: str,
        out: torch.Tensor | None,
        signs: dict[str, Any] | None,
        helper: ThreadPoolExecutor | None,
        later: list[Future[None]] | None = None,
    ) -> torch.Tensor | None:
        """`tensor` by the kernel; None when the slot's codes are not on the CPU. With
        ``later``, the part a ``helper`` computes may still be running on return: its
        future is appended there."""
        name, meta = self.plan[ck_name]
        assert name is not None and isinstance(self.superposition, QuantizedReader)
        slot = self.transform.slot_of(name)
        sup = self.superposition
        q = sup.quantized(slot)
        if q.codes.device.type != "cpu" or q.scales.device.type != "cpu":
            self._fused = False  # a superposition resident on a GPU: the torch path
            return None
        scheme = sup.scheme
        shape = meta.shape
        numel = math.prod(shape)
        target = out if out is not None else torch.empty(shape, dtype=meta.dtype)
        if signs is None:  # drawn here, not ahead: its stream is not lent from the pool
            name_signs = self.transform.signs(name, meta.shape)
            signs = name_signs.kernel_signs() if name_signs is not None else {}
        base_meta = self.base.meta(name)
        direct = (
            self._base_ranges and base_meta.dtype == torch.float32 and meta.dtype == torch.float32
        )
        flat = target.view(-1)
        if direct and numel and not self.base.read_range_into(name, 0, flat[:0]):  # type: ignore[attr-defined]
            direct = False  # a pinned reader: its tensors are read (and checked) whole
        if direct:
            work = flat
        else:  # another dtype on either side: compute in float32, convert once at the end
            work = self.base.get(name).to(torch.float32, memory_format=torch.contiguous_format)
            work = work.view(-1)
        align = quant_alignment(scheme, shape)  # whole groups and code bytes (and sign bytes)
        job = kernels.FusedJob(
            out=work.numpy(),
            codes=q.codes.numpy(),
            bits=scheme.bits,
            scales=q.scales.numpy(),
            group=scheme.group_of(shape),
            alpha=_scale_for(self.scale, name),
            signs=signs,
            step=align * max(1, FUSED_CHUNK // align),
            align=align,
        )
        if direct:
            base: Any = self.base  # a RangeReader, maybe a MappedReader
            if self._base_maps:
                job.map_range = partial(base.map_range, name)
                job.unmap_range = partial(base.unmap_range, name)
                job.drops = base.page_drops(name)
            job.read_range = lambda lo, hi: _read_or_fail(base, name, lo, work[lo:hi])
        if work.data_ptr() != target.data_ptr():
            job.run_all(helper)
            flat.copy_(work)  # to the fine-tune's dtype, as .to(meta.dtype) does
        else:
            job.run_all(helper, later)
        return target

    def _torch_tensor(self, ck_name: str) -> torch.Tensor:
        """The eager torch path of `tensor` (the reference the kernel is checked against).

        theta + lambda * T^-1(slot) is computed in place in the base tensor ``get``
        returned, one chunk of about CHUNK_ELEMENTS entries at a time (dequantize, undo
        the signs, add), through reused work buffers: the extra memory is a few chunks
        whatever the tensor's size, and the chunk's passes stay in the CPU cache. Every
        entry gets the very operations a whole-tensor computation gives it, so the
        result does not depend on the chunking (tests/core, tests/runtime).
        """
        name, meta = self.plan[ck_name]
        if name is None:
            assert self.private is not None
            return self.private.get(ck_name)  # verbatim
        theta = self.base.get(name)
        if name in self.layout.non_float or self.superposition is None:
            return theta.to(meta.dtype)
        slot = self.transform.slot_of(name)
        value = theta.to(torch.float32, memory_format=torch.contiguous_format)
        flat = value.view(-1)
        signs = self.transform.signs(name, tuple(value.shape))
        alpha = _scale_for(self.scale, name)
        sup = self.superposition
        whole: torch.Tensor | None = None
        align = signs.alignment if signs is not None else 1
        ranged: RangeSource = sup  # type: ignore[assignment]
        if self._ranged:
            align = math.lcm(align, ranged.alignment(slot))
        else:  # a source read whole (the fp32 master): chunks are views of its copy
            whole = sup.get(slot).to(torch.float32, memory_format=torch.contiguous_format)
            whole = whole.view(-1)
        step = align * max(1, CHUNK_ELEMENTS // align)
        for lo in range(0, flat.numel(), step):
            hi = min(lo + step, flat.numel())
            if whole is None:
                flips = partial(signs.apply_, buffers=self.buffers) if signs else None
                delta = ranged.get_range(slot, lo, hi, self.buffers, flips).to(torch.float32)
            else:
                delta = whole[lo:hi]
                if signs is not None:
                    signs.apply_(delta, lo, self.buffers)
            flat[lo:hi].add_(delta, alpha=alpha)
        del whole
        return value.to(meta.dtype)


TaskRetrieval = _Retrieval
"""The per-task plan that `retrieve` and `materialize` run, under a public name: in-memory
servers (storage.runtime) check its `specs` before touching a module and compute single
tensors with `tensor`, so what they serve is what materialize writes, bit for bit."""


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@dataclass
class _Computed:
    """A tensor `TaskRetrieval.tensors` computed, part of it maybe still on the helper."""

    name: str
    value: torch.Tensor
    signs: dict[str, Any] | None
    later: list[Future[None]]

    def finish(self, buffers: WorkBuffers) -> tuple[str, torch.Tensor]:
        for future in self.later:
            future.result()
        if self.signs is not None and "borrowed" in self.signs:
            buffers.streams.give_back(self.signs["borrowed"])
        return self.name, self.value


def retrieve(
    *,
    base: TensorSource,
    superposition: TensorSource | None,
    private: TensorSource | None,
    seed: int,
    key_map: KeyMap,
    config: TransformConfig,
    scale: float | Mapping[str, float],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (checkpoint name, tensor) of one task, in the fine-tune's dtypes.

    ``superposition=None`` stands for an all-zero superposition (a bundle without
    tasks). ``scale`` is lambda, or a dict of lambdas per base tensor name with an
    optional ``"*"`` default. Private tensors come back verbatim. Order: the base's
    tensors (sorted base names) but those ``key_map.absent``, then private tensors the
    base lacks (sorted).
    """
    plan = _Retrieval(
        base=base,
        superposition=superposition,
        private=private,
        seed=seed,
        key_map=key_map,
        config=config,
        scale=scale,
    )
    yield from plan.tensors(plan.plan)


def _read_or_fail(base: Any, name: str, lo: int, out: torch.Tensor) -> None:
    if not base.read_range_into(name, lo, out):
        raise RandesError(f"base tensor {name!r}: range read refused")  # probed: cannot happen

"""A task's retrieval compiled into one kernel call per thread: the serving runtime's
task switch.

`TaskRetrieval.tensors` computes a task tensor by tensor: per tensor it finds the
inputs, draws or reads the signs, splits the work over two threads and hands it
back, and between tensors the GIL goes back and forth. A 124M model has ~150
tensors, and measured with the kernel made a no-op that bookkeeping alone took
0.028 s of a 0.072 s switch (0.021 s of the calling thread). Yet every input of a
task's kernel work stays where it is from one switch to the next: the base and the
codes in their mappings (storage.file_maps), the kept sign streams in theirs
(storage.sign_files), the small tensors in the readers' memory. Only the outputs
change, and only when the module does.

So a `SwitchProgram` records, once per task, every range the kernel computes as a
row of addresses and sizes (randes.kernels_jit.run_program), sorted by base address
and cut into two contiguous halves, one per thread: each thread walks its half of
the base file in order, dropping the pages it has passed, and neither comes back to
Python until it is done. A run fills in the module's output addresses (checked
first) and makes two calls. What the program does not cover (private tensors, other
dtypes) the caller computes the usual way. A task's large sign streams must be kept
(storage.sign_files) for it to have a program: building one draws and keeps those
not kept yet, which makes a task's first switch its slowest (0.08 s against 0.04 s for
a 124M model, docs/benchmarks.md).

The rows hold addresses, not the arrays: a program must not outlive the readers it
was built over (the runtime drops its programs before it closes them), and holds
only what it drew itself (small sign streams, side signs) and what is not lent from
a mapping (a reader's resident tensors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from randes import kernels, retrieve
from randes.program_rows import (
    BASE,
    BASE_HIGH,
    BASE_LOW,
    BITS,
    CODES,
    COLS,
    DROP_FIELDS,
    DROPS,
    EBITS,
    GROUP,
    LO,
    MODE,
    N_ROWS,
    N_SCALES,
    OUT,
    ROW_FIELDS,
    ROWS,
    SCALES,
    STEP,
    WIDTH,
    N,
)
from randes.quantize import chunk_alignment
from randes.retrieval_inputs import MappedReader, PageDrops
from randes.retrieve import FUSED_CHUNK, TaskRetrieval, _scale_for, halves
from randes.serving import QuantizedReader


@dataclass
class _Row:
    name: str
    values: list[int]
    alpha: float
    align: int


@dataclass
class SwitchProgram:
    """The kernel work of one task, as rows per thread (see the module docstring)."""

    parts: list[np.ndarray]
    """int64 rows (`ROW_FIELDS` columns) per thread; the OUT column is filled per run."""
    alphas: list[np.ndarray]
    outputs: list[list[tuple[int, str, int]]]
    """Per part: (row, output name, byte offset of the row in that output)."""
    sizes: dict[str, int]
    """Entries of each output the program computes."""
    rest: list[str]
    """The task's tensors the program does not compute, in the plan's order."""
    span: int
    margin: int
    advice: int
    flush: list[tuple[int, int]]
    """The mappings whose pages are dropped when a run is done (each part leaves its
    last partial spans mapped, and faults map pages around what they read)."""
    held: list[Any] = field(default_factory=list)
    """What the rows address that is not lent from a mapping: kept alive here."""

    @classmethod
    def build(cls, plan: TaskRetrieval, threads: int = 2) -> SwitchProgram | None:
        """The program of ``plan``, or None where none can be compiled (no kernel here,
        a base that lends nothing, large sign streams that cannot be kept: no store, or
        over its budget). The streams not kept yet are drawn and kept first."""
        sup, base = plan.superposition, plan.base
        if not (kernels.available() and isinstance(sup, QuantizedReader)):
            return None
        if not isinstance(base, MappedReader):
            return None
        rows: list[_Row] = []
        rest: list[str] = []
        held: list[Any] = []
        drops_seen: list[PageDrops] = []
        _keep_streams(plan)
        try:
            for spec in plan.specs():
                row = _row(plan, sup, base, spec.name, held, drops_seen)
                if row is False:
                    return None
                if isinstance(row, _Row):
                    rows.append(row)
                else:
                    rest.append(spec.name)
        finally:
            sup.release_held()
        if not rows:
            return None
        rows.sort(key=lambda r: r.values[BASE])
        parts = _split(rows, max(1, threads))
        any_drops = drops_seen[0] if drops_seen else None
        return cls(
            parts=[
                np.array([r.values for r in p], dtype=np.int64).reshape(-1, ROW_FIELDS)
                for p in parts
            ],
            alphas=[np.array([r.alpha for r in p], dtype=np.float32) for p in parts],
            outputs=[[(i, r.name, r.values[OUT]) for i, r in enumerate(p)] for p in parts],
            sizes={r.name: _entries(plan, r.name) for r in rows},
            rest=rest,
            span=any_drops.span if any_drops else 1,
            margin=any_drops.margin if any_drops else 0,
            advice=any_drops.advice if any_drops else 0,
            flush=_flush_ranges(rows),
            held=held,
        )

    def fits(self, outs: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``outs`` holds every output as the program writes it: contiguous
        float32 on the CPU, of its size, no two sharing memory (tied weights are
        computed one after the other by the plan's own path)."""
        spans = []
        for name, numel in self.sizes.items():
            t = outs.get(name)
            if t is None or t.device.type != "cpu" or t.dtype != torch.float32:
                return False
            if not t.is_contiguous() or t.numel() != numel:
                return False
            spans.append((t.data_ptr(), t.data_ptr() + 4 * numel))
        spans.sort()
        return all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))

    def run(self, outs: Mapping[str, torch.Tensor]) -> None:
        """Compute every output the program covers into ``outs`` (`fits` them first):
        the first part on this thread, the others on the process's helper thread
        meanwhile."""
        tables = []
        for part, outputs in zip(self.parts, self.outputs, strict=True):
            table = part.copy()  # two runs at once (two modules) fill their own
            for i, name, offset in outputs:
                table[i, OUT] = outs[name].data_ptr() + offset
            tables.append(table)
        args = (kernels.UNMAP_ENTRIES, self.margin, self.span, self.advice)
        helper = halves.get()
        others = [
            helper.submit(kernels.run_program_, table, alphas, *args)
            for table, alphas in zip(tables[1:], self.alphas[1:], strict=True)
        ]
        try:
            kernels.run_program_(tables[0], self.alphas[0], *args)
        finally:
            wait(others)  # never leave a part running behind a failure
        for future in others:
            future.result()
        if self.flush:
            lows, highs = zip(*self.flush, strict=True)
            kernels.drop_pages(list(lows), list(highs), self.advice)


def _entries(plan: TaskRetrieval, name: str) -> int:
    return math.prod(plan.plan[name][1].shape)


def _row(
    plan: TaskRetrieval,
    sup: QuantizedReader,
    base: MappedReader,
    ck_name: str,
    held: list[Any],
    drops_seen: list[PageDrops],
) -> _Row | None | bool:
    """The row of ``ck_name``; None: the plan's own path computes it; False: it should
    be in the program and cannot yet (its signs are not kept)."""
    name, meta = plan.plan[ck_name]
    if name is None or meta.dtype != torch.float32 or not plan.fusable(ck_name):
        return None
    if plan.base.meta(name).dtype != torch.float32:
        return None
    shape = tuple(meta.shape)
    numel = math.prod(shape)
    if not numel:
        return None
    slot = plan.transform.slot_of(name)
    q = sup.quantized(slot)
    if q.codes.device.type != "cpu" or q.scales.device.type != "cpu":
        return None
    lent = base.map_range(name, 0, numel)
    if lent is None:
        return None
    base_drops = base.page_drops(name)
    code_drops, scale_drops = sup.lent_drops(slot)
    for tensor, drops in ((lent, base_drops), (q.codes, code_drops), (q.scales, scale_drops)):
        if drops is None:
            held.append(tensor)  # not from a mapping: the row's address must stay valid
        else:
            drops_seen.append(drops)
    scheme = sup.scheme
    group = scheme.group_of(shape)
    align = chunk_alignment(scheme, shape)
    values = [0] * ROW_FIELDS
    values[N], values[GROUP], values[BITS] = numel, group, scheme.bits
    values[BASE] = lent.ctypes.data
    values[CODES], values[SCALES] = q.codes.data_ptr(), q.scales.data_ptr()
    values[N_SCALES] = q.scales.numel()
    values[STEP] = align * max(1, FUSED_CHUNK // align)
    if base_drops is not None:
        values[BASE_LOW], values[BASE_HIGH] = base_drops.low, base_drops.high
    _drops_at(values, DROPS, q.codes.data_ptr(), q.codes.numel(), code_drops)
    _drops_at(values, DROPS + DROP_FIELDS, q.scales.data_ptr(), 4 * q.scales.numel(), scale_drops)
    signs = plan.transform.signs(name, meta.shape)
    if signs is not None and signs.numel:
        if signs.kind == "elementwise":
            nbytes = -(-numel // 8)
            if numel < retrieve.SIGNS_AHEAD_MIN:  # a few bytes: drawn here and held
                stream = signs.kernel_signs()["ebits"]
                held.append(stream)
                values[EBITS] = stream.ctypes.data
            else:
                kept = plan.kept_signs.stream_address(ck_name, nbytes) if plan.kept_signs else None
                if kept is None:
                    return False  # over the streams' budget (or none kept at all)
                values[EBITS] = kept[0]
                _drops_at(values, DROPS + 2 * DROP_FIELDS, kept[0], nbytes, kept[1])
                drops_seen.append(kept[1])
            words = group % 64 == 0 and kernels.WORD_SIGNS
            values[MODE] = kernels.MODE_ELEMENTWISE_UNITS if words else kernels.MODE_ELEMENTWISE
        else:
            sides = signs.kernel_signs()
            held.append(sides)
            values[MODE] = kernels.MODE_SIDES
            values[COLS], values[WIDTH] = sides["cols"].ctypes.data, int(sides["width"])
            if "rows" in sides:
                values[ROWS], values[N_ROWS] = sides["rows"].ctypes.data, sides["rows"].size
    else:
        values[MODE] = kernels.MODE_NONE
    return _Row(ck_name, values, _scale_for(plan.scale, name), align)


def _keep_streams(plan: TaskRetrieval) -> None:
    """Draw and keep every large elementwise stream of ``plan`` not kept yet (a task's
    first switch; 15.5 MB of SHAKE-256 for a 124M model, ~0.03 s on one core, which
    holds the GIL: drawing on two threads is slower), all before any is mapped, so the
    scratch file is mapped once at its full size. Streams over the budget stay unkept
    (`build` then gives no program)."""
    kept_signs, pool = plan.kept_signs, plan.buffers.streams
    if kept_signs is None:
        return
    for ck_name in (spec.name for spec in plan.specs()):
        name, meta = plan.plan[ck_name]
        numel = math.prod(meta.shape)
        if name is None or numel < retrieve.SIGNS_AHEAD_MIN or not plan.fusable(ck_name):
            continue
        signs = plan.transform.signs(name, meta.shape)
        if signs is None or signs.kind != "elementwise" or not signs.numel:
            continue
        if kept_signs.holds(ck_name, -(-numel // 8)):
            continue
        drawn = signs.kernel_signs(pool)
        try:
            kept_signs.keep(ck_name, drawn["ebits"])
        finally:
            if "borrowed" in drawn:
                pool.give_back(drawn["borrowed"])


def _drops_at(
    values: list[int], at: int, address: int, nbytes: int, drops: PageDrops | None
) -> None:
    if drops is not None:
        values[at : at + DROP_FIELDS] = [address, nbytes, drops.low, drops.high]


def _split(rows: list[_Row], parts: int) -> list[list[_Row]]:
    """``rows`` (in base order) cut into ``parts`` contiguous runs of about as many
    entries each, a row cut at an aligned entry where a run ends inside it."""
    total = sum(r.values[N] for r in rows)
    out: list[list[_Row]] = [[] for _ in range(parts)]
    done, k = 0, 0
    for row in rows:
        while True:
            goal = total * (k + 1) // parts
            n = row.values[N]
            if k == parts - 1 or done + n <= goal:
                out[k].append(row)
                done += n
                break
            cut = (goal - done) // row.align * row.align
            if cut > 0:
                head, row = _cut(row, cut)
                out[k].append(head)
                done += cut
            k += 1
    return [p for p in out if p]


def _cut(row: _Row, cut: int) -> tuple[_Row, _Row]:
    """``row`` as its first ``cut`` entries and the rest (``cut`` aligned)."""
    v = row.values
    head, tail = list(v), list(v)
    group, bits = v[GROUP], v[BITS]
    head[N], tail[N] = cut, v[N] - cut
    head[N_SCALES], tail[N_SCALES] = cut // group, v[N_SCALES] - cut // group
    tail[OUT] += 4 * cut  # a byte offset into the output until a run adds its address
    tail[BASE] += 4 * cut
    tail[CODES] += cut * bits // 8
    tail[SCALES] += 4 * (cut // group)
    tail[LO] += cut
    if v[EBITS]:
        tail[EBITS] += cut // 8
    for at, nbytes in (
        (DROPS, cut * bits // 8),
        (DROPS + DROP_FIELDS, 4 * (cut // group)),
        (DROPS + 2 * DROP_FIELDS, cut // 8),
    ):
        if v[at + 3]:
            head[at + 1] = nbytes
            tail[at] += nbytes
            tail[at + 1] -= nbytes
    return _Row(row.name, head, row.alpha, row.align), _Row(row.name, tail, row.alpha, row.align)


def _flush_ranges(rows: list[_Row]) -> list[tuple[int, int]]:
    """The bounds of every mapping the rows read: all of it is dropped at the end of a
    run (faults map pages around the bytes read, beyond a row's own range; dropping
    what is not mapped costs a page-table walk, not a fault)."""
    mappings = set()
    for row in rows:
        v = row.values
        mappings.add((v[BASE_LOW], v[BASE_HIGH]))
        mappings.update((v[a + 2], v[a + 3]) for a in range(DROPS, ROW_FIELDS, DROP_FIELDS))
    return sorted(m for m in mappings if m[1])

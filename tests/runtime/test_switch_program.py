"""randes.switch_program: a task switch compiled into one kernel call per thread.

The bundles are folded from transformers fine-tunes saved by ``save_pretrained``
(tests/runtime/conftest.py). What a compiled switch writes is compared bit for bit
with `BundleRuntime.state_dict`, the plan's own path (what ``materialize`` writes);
the pages it leaves mapped are read from the kernel (/proc/self/smaps).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from randes import kernels
from randes.program_rows import BASE_LOW, DROP_FIELDS, DROPS, MODE, ROW_FIELDS, N
from randes.switch_program import SwitchProgram
from storage.file_maps import SPAN
from storage.runtime import BundleRuntime
from tests.runtime.conftest import Served
from tests.runtime.test_file_maps import _mapping_rss

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not importable")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _compiled(rt: BundleRuntime, model: torch.nn.Module, task: str) -> SwitchProgram:
    rt.switch(model, task)
    program = rt._programs.get(task)
    assert isinstance(program, SwitchProgram)
    return program


def _mappings(program: SwitchProgram) -> set[int]:
    """The start of every mapping the program's rows read (base, serving copy, streams)."""
    starts = set()
    for part in program.parts:
        for row in part.tolist():
            starts.add(row[BASE_LOW])
            starts.update(row[d + 2] for d in range(DROPS, ROW_FIELDS, DROP_FIELDS))
    return starts - {0}


def test_a_task_s_first_switch_keeps_its_streams_and_runs_compiled(served_wide: Served) -> None:
    """The first switch of a task draws and keeps its large sign streams, then runs
    compiled: every superposed tensor, split over two threads inside a tensor, written
    as the plan's path computes it, bit for bit, for every task in turn."""
    with BundleRuntime.open(served_wide.pulled) as rt:
        model = rt.model("t1")
        assert isinstance(rt._programs.get("t1"), SwitchProgram)
        files = rt._sign_files
        assert files is not None and files.used >= 32768 * 128 // 8  # the embedding's stream
        _assert_same(model.state_dict(), rt.state_dict("t1"))
        for task in ["t3", "t1", "t3"]:
            program = _compiled(rt, model, task)
            _assert_same(model.state_dict(), rt.state_dict(task))
        plan = rt.plan("t3")
        private = [name for name, (base, _) in plan.plan.items() if base is None]
        assert program.rest == private  # the head: everything else is compiled
        assert sorted(program.sizes) == sorted(set(plan.plan) - set(private))
        halves = [{name for _, name, _ in part} for part in program.outputs]
        assert len(halves) == 2 and halves[0] & halves[1]  # one tensor cut between them
        assert sum(int(p[:, N].sum()) for p in program.parts) == sum(program.sizes.values())


@pytest.mark.parametrize("task", ["t1", "t3"])
def test_two_sided_maps_are_compiled_from_the_first_switch(served: Served, task: str) -> None:
    """Side signs are drawn when the program is built (no stream to keep): a module is
    switched compiled at once, BERT and GPT-2 alike."""
    with BundleRuntime.open(served.pulled) as rt:
        model = rt.model("t3")
        program = _compiled(rt, model, task)
        assert any(row[MODE] == kernels.MODE_SIDES for p in program.parts for row in p.tolist())
        _assert_same(model.state_dict(), rt.state_dict(task))


@linux
def test_a_compiled_switch_leaves_none_of_its_inputs_mapped(served_wide: Served) -> None:
    """Each thread drops the pages it passed as it goes: with the final drop turned
    off at most a few spans of the 8-span base stay mapped; with it, none of any
    input (base, codes and scales, kept sign stream)."""
    with BundleRuntime.open(served_wide.pulled) as rt:
        model = rt.model("t1")
        program = _compiled(rt, model, "t1")
        base_start = {int(row[BASE_LOW]) for p in program.parts for row in p} - {0}
        assert len(base_start) == 1 and len(_mappings(program)) >= 3
        flush, program.flush = program.flush, []
        rt.switch(model, "t1")
        (base,) = base_start
        assert _mapping_rss(base) <= 2 * len(program.parts) * SPAN  # of 16+ MiB
        program.flush = flush
        rt.switch(model, "t1")
        for start in _mappings(program):
            assert _mapping_rss(start) == 0
        _assert_same(model.state_dict(), rt.state_dict("t1"))


def test_a_module_the_program_does_not_fit_is_switched_by_the_plan(served_wide: Served) -> None:
    """An output the program cannot write in place (here a non-contiguous embedding)
    sends the whole switch down the plan's path, with the same result."""
    with BundleRuntime.open(served_wide.pulled) as rt:
        model = rt.model("t1")
        rt.switch(model, "t3")
        program = _compiled(rt, model, "t1")
        weight = model.transformer.wte.weight
        weight.data = weight.data.t().contiguous().t()  # same shape and values, strided
        outs = {k: v.data for k, v in model.state_dict(keep_vars=True).items()}
        assert not program.fits(outs)
        rt.switch(model, "t3")
        _assert_same(model.state_dict(), rt.state_dict("t3"))
        assert not weight.is_contiguous()  # written in place, not replaced


def test_without_kept_streams_no_program_is_built(served_wide: Served) -> None:
    """``sign_budget=0`` (or a budget the large streams do not fit): they are drawn at
    every switch, which a program cannot read in place; the runtime remembers that
    and keeps the plan's path."""
    with BundleRuntime.open(served_wide.pulled, sign_budget=0) as rt:
        model = rt.model("t1")
        for task in ["t3", "t1"]:
            rt.switch(model, task)
            assert "t1" in rt._programs and rt._programs["t1"] is None
        _assert_same(model.state_dict(), rt.state_dict("t1"))


def test_page_drops_never_leave_their_mapping() -> None:
    """What a compiled switch hands madvise(MADV_DONTNEED) stays within the mapping it
    read (below or above it lies other memory of the process, which the advice would
    zero) and is whole spans or the mapping's own start, whatever range it is given."""
    from randes.kernels_jit import drop_bounds

    rng = np.random.default_rng(0)
    span, page = SPAN, 4096
    for _ in range(2000):
        low = int(rng.integers(1, 1 << 20)) * page  # page-aligned, rarely span-aligned
        high = low + int(rng.integers(1, 8 * span))
        first = low + int(rng.integers(-span, high - low + span))
        last = first + int(rng.integers(0, 4 * span))
        lo, hi = drop_bounds(first, last, low, high, span)
        if hi > lo:
            assert low <= lo and hi <= high
            assert lo % span == 0 or lo == low
            assert hi % span == 0
            assert lo >= first - first % span and hi <= last

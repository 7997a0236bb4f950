"""Sign streams a runtime keeps (storage.sign_files): drawn once per task, read back
after, the same bits either way; within budget; gone when the runtime closes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from randes import kernels, rng
from storage.runtime import BundleRuntime
from storage.sign_files import SignFiles
from tests.runtime.conftest import Served

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not importable")


@pytest.fixture(autouse=True)
def _tiny_tensors_drawn_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams are kept for the tensors whose signs are drawn ahead; in these tiny
    models that is none of them by default (randes.retrieve.SIGNS_AHEAD_MIN)."""
    monkeypatch.setattr("randes.retrieve.SIGNS_AHEAD_MIN", 0)


def _switched(rt: BundleRuntime, model: torch.nn.Module, task: str) -> dict[str, torch.Tensor]:
    rt.switch(model, task)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_streams_are_drawn_once_per_task_and_read_back_bit_for_bit(
    served_elementwise: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    with BundleRuntime.open(served_elementwise.pulled, sign_budget=0) as rt:
        model = rt.model("t1")
        want = {task: _switched(rt, model, task) for task in ["t3", "t1"]}
    draws: list[str] = []
    real = rng.element_sign_bytes

    def counted(seed: int, name: str, chunk: int, n: int) -> bytes:
        draws.append(name)
        return real(seed, name, chunk, n)

    monkeypatch.setattr("randes.transforms.element_sign_bytes", counted)
    with BundleRuntime.open(served_elementwise.pulled) as rt:
        model = rt.model("t1")
        scratch = rt._sign_files._dir  # type: ignore[union-attr]
        assert scratch.is_dir()
        _same(_switched(rt, model, "t3"), want["t3"])
        drawn_once = len(draws)
        assert drawn_once > 0
        _same(_switched(rt, model, "t1"), want["t1"])
        after_both = len(draws)
        for task in ["t3", "t1", "t3", "t1"]:
            _same(_switched(rt, model, task), want[task])
        assert len(draws) == after_both  # every later switch read its streams back
    assert not scratch.exists()  # the scratch goes with the runtime


def test_the_budget_caps_what_is_kept_and_results_do_not_change(
    served_elementwise: Served,
) -> None:
    with BundleRuntime.open(served_elementwise.pulled, sign_budget=0) as rt:
        assert rt._sign_files is None
        model = rt.model("t1")
        want = _switched(rt, model, "t3")
    budget = 1000  # bytes: a few small tensors' streams, not the whole model's
    with BundleRuntime.open(served_elementwise.pulled, sign_budget=budget) as rt:
        model = rt.model("t1")
        for _ in range(3):
            _switched(rt, model, "t1")
            _same(_switched(rt, model, "t3"), want)
        files = rt._sign_files
        assert files is not None and 0 < files.used <= budget


def test_a_cut_scratch_file_is_drawn_again(tmp_path: Path) -> None:
    files = SignFiles(parent=tmp_path)
    store = files.task(0)
    stream = np.arange(4096, dtype=np.uint8)
    store.keep("w", stream)
    out = np.empty(4096, dtype=np.uint8)
    assert store.read_into("w", out) and np.array_equal(out, stream)
    assert not store.read_into("w", np.empty(10, dtype=np.uint8))  # another size: not it
    (path,) = [p for p in Path(files._dir).iterdir() if p.suffix == ".bits"]
    with open(path, "r+b") as fh:
        fh.truncate(100)
    assert not store.read_into("w", out)  # short: not trusted, the caller draws again
    files.close()
    assert not any(tmp_path.iterdir())


def test_a_negative_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="budget"):
        SignFiles(-1, parent=tmp_path)


def test_a_scratch_that_cannot_be_written_stops_keeping_not_serving(tmp_path: Path) -> None:
    files = SignFiles(parent=tmp_path)
    store = files.task(0)
    store.keep("a", np.ones(100, dtype=np.uint8))
    fd = store._fd
    assert fd is not None
    os.close(fd)  # writes now fail (EBADF), as a full or vanished scratch disk would
    store._fd = os.open(os.devnull, os.O_RDONLY)
    store.keep("b", np.ones(100, dtype=np.uint8))  # no exception
    assert files.budget == files.used  # nothing more is kept
    assert not store.read_into("b", np.empty(100, dtype=np.uint8))
    files.close()


def test_kept_streams_are_lent_in_place_from_a_mapping(tmp_path: Path) -> None:
    """A compiled switch reads a kept stream at the address `stream_address` gives: the
    kept bytes, also after the file grew (a new mapping; the old one stays valid, its
    addresses may be in use), and nothing for a stream not kept or of another size."""
    import ctypes

    files = SignFiles(parent=tmp_path)
    store = files.task(0)
    first, second = np.arange(5000, dtype=np.uint8), np.arange(7000, dtype=np.uint8)[::-1]
    store.keep("a", first)
    assert store.holds("a", 5000) and not store.holds("a", 10) and not store.holds("b", 7000)
    where_a = store.stream_address("a", 5000)
    assert where_a is not None and store.stream_address("b", 7000) is None
    store.keep("b", np.ascontiguousarray(second))
    where_b = store.stream_address("b", 7000)
    assert where_b is not None and where_b[1] != where_a[1]  # mapped again, bigger
    assert ctypes.string_at(where_a[0], 5000) == first.tobytes()  # the old mapping still
    assert ctypes.string_at(where_b[0], 7000) == second.tobytes()
    low, high = where_b[1].low, where_b[1].high
    assert low <= where_b[0] and where_b[0] + 7000 <= high
    files.close()
    assert not any(tmp_path.iterdir())

"""storage.file_maps: tensors read in place from their files, and their pages given back.

The files are written by safetensors' own ``save_file`` (what transformers writes).
Residency is read from the kernel (/proc/self/smaps: the Rss of the mapping), so the
tests see what a server's RSS sees.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from randes.checkpoint import CheckpointReader
from randes.quantize import QuantScheme, quantize
from randes.serving import QuantizedReader, codes_name, scales_name
from randes.source import TensorMeta
from storage.file_maps import (
    PENDING_SPANS,
    RECACHE_MIN,
    SMALL_FOLIO_FAULTS,
    SPAN,
    FileMaps,
    MappedCheckpointReader,
    _large_folios,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _mapping_rss(address: int) -> int:
    """Bytes resident in this process of the mapping holding ``address``."""
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds that address")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file(
        {
            "big": torch.randn(6 * SPAN // 4 + 123, generator=g),  # 6 spans of float32 and a bit
            "codes": torch.randint(0, 256, (3 * SPAN + 7,), dtype=torch.uint8, generator=g),
            "half": torch.randn(33, 5, generator=g).to(torch.bfloat16),
            "small": torch.randn(7, 3, generator=g),
        },
        str(path),
    )
    return path


def test_mapped_tensors_are_the_file_s_tensors(checkpoint: Path) -> None:
    want = load_file(str(checkpoint))
    with MappedCheckpointReader.from_files([checkpoint]) as reader:
        for name in ("big", "codes"):
            lent = reader.mapped(name)
            assert lent is not None, name
            assert lent.dtype == want[name].dtype and torch.equal(lent, want[name]), name
        assert reader.mapped("half") is None  # a dtype it does not lend: read instead
        assert torch.equal(reader.get("half"), want["half"])
        # a tensor under LEND_MIN is lent from memory: mapped, it would hold a 2 MiB span
        small = reader.mapped("small")
        assert small is not None and torch.equal(small, want["small"])
        ranged_small = reader.map_range("small", 3, 21)
        assert ranged_small is not None
        assert np.array_equal(ranged_small, want["small"].view(-1)[3:21].numpy())
        assert reader.page_drops("small") is None and reader.held_bytes == 7 * 3 * 4
        lo, hi = 1000, 1000 + SPAN
        ranged = reader.map_range("big", lo, hi)
        assert ranged is not None
        assert np.array_equal(ranged, want["big"][lo:hi].numpy())


def test_writes_to_a_lent_tensor_never_reach_the_file(checkpoint: Path) -> None:
    before = checkpoint.read_bytes()
    with MappedCheckpointReader.from_files([checkpoint]) as reader:
        lent = reader.mapped("big")
        assert lent is not None
        lent.fill_(7.0)  # a private mapping: the process's copy only
        del lent
    assert checkpoint.read_bytes() == before


def _pass(reader: MappedCheckpointReader, hi_end: int, window: int) -> tuple[float, int, int]:
    """The fused kernel's pattern over entries [0, hi_end) of "big": map a window, read
    it, give it back (``done=False``), next window. Returns (sum, last address, peak
    RSS of the mapping)."""
    total, address, peak = 0.0, 0, 0
    for lo in range(0, hi_end, window):
        hi = min(hi_end, lo + window)
        chunk = reader.map_range("big", lo, hi)
        assert chunk is not None
        address = chunk.ctypes.data
        total += float(chunk.sum())  # touches every page
        del chunk
        peak = max(peak, _mapping_rss(address))
        reader.unmap_range("big", lo, hi, False)
    return total, address, peak


@linux
def test_a_pass_over_a_tensor_leaves_none_of_it_resident(checkpoint: Path) -> None:
    """At most the window and the spans around it are resident at any time; once the
    pass reached its end, only its last span (deferred: the next tensor in the file
    starts there), and none of it once the pass over the reader ends (`flush_maps`)."""
    with MappedCheckpointReader.from_files([checkpoint]) as reader:
        n = reader.meta("big").numel
        total, address, peak = _pass(reader, n, SPAN // 4)  # windows of one span of float32
        assert peak <= 4 * SPAN  # never the whole 6+ spans
        assert _mapping_rss(address) <= SPAN
        reader.flush_maps()
        assert _mapping_rss(address) == 0
        assert total == pytest.approx(float(load_file(str(checkpoint))["big"].sum()), rel=1e-4)


@linux
def test_a_pass_over_part_of_a_tensor_leaves_none_of_it_resident(checkpoint: Path) -> None:
    """A thread computing the first half of a tensor (the second half runs on another)
    stops mid-span: its final ``done`` drop defers that partial span, which the end of
    the pass drops, so halves leave nothing mapped behind them either."""
    with MappedCheckpointReader.from_files([checkpoint]) as reader:
        mid = reader.meta("big").numel // 2 + 1000  # not on a span boundary
        _, address, _ = _pass(reader, mid, SPAN // 8)
        assert _mapping_rss(address) > 0  # the span in use stays mapped until done
        reader.unmap_range("big", mid, mid, True)
        assert _mapping_rss(address) <= SPAN
        reader.flush_maps()
        assert _mapping_rss(address) == 0


@linux
def test_released_tensors_leave_the_process(checkpoint: Path) -> None:
    with MappedCheckpointReader.from_files([checkpoint]) as reader:
        lent = reader.mapped("codes")
        assert lent is not None
        address = lent.data_ptr()
        assert int(lent.sum()) > 0  # touches every page
        assert _mapping_rss(address) >= 3 * SPAN
        del lent
        reader.release("codes")
        assert _mapping_rss(address) <= SPAN  # the last span, where the next tensor starts
        reader.flush_maps()
        assert _mapping_rss(address) == 0


@linux
def test_a_quantized_reader_holds_one_slot_s_codes_mapped(tmp_path: Path) -> None:
    """Over a lending source, QuantizedReader dequantizes codes read in place, gives
    the same values as over a plain file reader, and gives a slot's pages back when it
    moves to the next slot, and the last one's when the pass is over (`release_held`)."""
    g = torch.Generator().manual_seed(1)
    scheme = QuantScheme(bits=4, group_size=64)
    master = {f"w{i}": torch.randn(4 * SPAN, generator=g) for i in range(4)}  # 4 MiB of codes each
    stored: dict[str, torch.Tensor] = {}
    for name, value in master.items():
        q = quantize(value, scheme)
        stored[codes_name(name)], stored[scales_name(name)] = q.codes, q.scales
    path = tmp_path / "serving.safetensors"
    save_file(stored, str(path))
    metas = {name: TensorMeta(t.dtype, tuple(t.shape)) for name, t in master.items()}
    mapped = MappedCheckpointReader.from_files([path])
    with (
        QuantizedReader(mapped, scheme, metas) as lent,
        QuantizedReader(CheckpointReader.from_files([path]), scheme, metas) as read,
    ):
        addresses = []
        for name in sorted(master):
            assert torch.equal(lent.get(name), read.get(name)), name
            addresses.append(lent.quantized(name).codes.data_ptr())
            # this slot's codes are resident, with at most a span on either side; the
            # slots before it were given back (all four would be 16 MiB)
            assert _mapping_rss(addresses[-1]) <= stored[codes_name(name)].numel() + 2 * SPAN
        assert _mapping_rss(addresses[-1]) >= stored[codes_name("w3")].numel() // 2
        lent.release_held()
        mapped.flush_maps()
        assert _mapping_rss(addresses[-1]) == 0


@linux
def test_deferred_spans_are_bounded_and_dropped_at_the_end_of_a_pass(tmp_path: Path) -> None:
    """Each released tensor leaves its last span mapped for the next one; never more than
    PENDING_SPANS of them stay, and `flush_maps` drops them all."""
    g = torch.Generator().manual_seed(2)
    count = PENDING_SPANS + 6
    path = tmp_path / "many.safetensors"
    # each tensor a span and 4 KiB of float32: each ends in a span of its own
    save_file(
        {f"t{i:02d}": torch.randn(SPAN // 4 + 1024, generator=g) for i in range(count)}, str(path)
    )
    with MappedCheckpointReader.from_files([path]) as reader:
        address = 0
        for i in range(count):
            lent = reader.mapped(f"t{i:02d}")
            assert lent is not None
            address = lent.data_ptr()
            assert float(lent.sum()) != 0.0  # touches every page
            del lent
            reader.release(f"t{i:02d}")
            assert _mapping_rss(address) <= (PENDING_SPANS + 1) * SPAN
        assert _mapping_rss(address) > 0
        reader.flush_maps()
        assert _mapping_rss(address) == 0


def _cache_in_small_folios(path: Path) -> None:
    """Drop ``path`` from the page cache and read it back a 4 KiB page at a time with
    readahead off: every page its own small folio."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            mapped.madvise(mmap.MADV_RANDOM)
            mapped.madvise(mmap.MADV_NOHUGEPAGE)
            view = np.frombuffer(mapped, dtype=np.uint8)
            int(view[:: mmap.PAGESIZE].sum())
            del view
    finally:
        os.close(fd)


@linux
def test_recache_brings_a_file_cached_in_small_folios_into_large_ones(tmp_path: Path) -> None:
    """Small folios cost a fault per 64 KiB (16 per MiB); `recache` reads the file back
    so that one fault maps 2 MiB, where the kernel has transparent huge pages (else it
    is a no-op), and the bytes read in place are unchanged."""
    path = tmp_path / "base.safetensors"
    value = torch.randn(4 * RECACHE_MIN // 4, generator=torch.Generator().manual_seed(3))
    save_file({"w": value}, str(path))
    _cache_in_small_folios(path)
    maps = FileMaps()
    try:
        mib = path.stat().st_size / (1 << 20)
        assert maps.view(path, 0, 0) is not None
        small = maps._touch(path) / mib
        assert small > 2 * SMALL_FOLIO_FAULTS  # the state this is for
        if not _large_folios():
            assert maps.recache(path) is False
            return
        assert maps.recache(path) is True
        assert maps._touch(path) / mib <= SMALL_FOLIO_FAULTS
        assert maps.recache(path) is False  # large already: not read again
    finally:
        maps.close()
    with MappedCheckpointReader.from_files([path]) as reader:
        lent = reader.mapped("w")
        assert lent is not None and torch.equal(lent, value)

"""A refusal the header decides costs under a second and 50 MB, whatever the file size.

The checkpoint's headers are checked against the base (names, shapes, dtypes) before
a byte of its data is hashed, and a header's tensor count is bounded before its JSON
is parsed. The files here are sparse (a 2 GiB tensor that takes no disk), so hashing
one would take many seconds: the time bound shows that no data was read. Memory is
what Python allocates during the command (tracemalloc): a header refusal reads no
tensor, so no torch allocation is involved.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.test_data_loss import (
    BASE,
    BUNDLE,
    Env,
    Models,
    ok,
    refused,
    snapshot_registry_and_store,
)
from tests.reliability.test_data_loss import local as local  # noqa: F401 - fixture
from tests.reliability.test_data_loss import models as models  # noqa: F401 - fixture

MAX_SECONDS = 1.0
MAX_BYTES = 50 * 1024 * 1024


def _write(path: Path, header: dict[str, object], data_len: int) -> Path:
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + data_len)  # sparse: no data block is written
    return path.parent


def _sparse_huge_tensor(root: Path, base: Path) -> Path:
    """One 2 GiB tensor named like the base's embedding (which is 50 x 32), nothing else:
    not a fine-tune of this base (a tensor of another shape alone would be kept as the
    task's own, so the refusal here is the base match)."""
    del base
    n = 2**29
    header = {"wte.weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    return _write(root / "huge" / "model.safetensors", header, 4 * n)


def _header_of_16_mib(root: Path, base: Path) -> Path:
    """16 MiB of header: ~200k one-value tensors (parsing them all would cost ~200 MB)."""
    header: dict[str, object] = {}
    offset = 0
    entry = len(json.dumps({"model.layers.000000.weight": {"dtype": "F32", "shape": [1]}}))
    for i in range(16 * 2**20 // (entry + 30)):
        name = f"model.layers.{i:06d}.weight"
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}
        offset += 4
    return _write(root / "wide" / "model.safetensors", header, offset)


def _metadata_header(root: Path, base: Path) -> Path:
    """16 MiB of metadata and one 1 GiB tensor the base does not have."""
    n = 2**28
    header = {
        "__metadata__": {"notes": "x" * (16 * 2**20)},
        "other.weight": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
    }
    return _write(root / "noted" / "model.safetensors", header, 4 * n)


CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "sparse 2 GiB file, no fine-tune of the base": (_sparse_huge_tensor, "matches only 0%"),
    "16 MiB header of 200k tensors": (_header_of_16_mib, "tensors declared"),
    "16 MiB of metadata, a 1 GiB tensor the base lacks": (_metadata_header, "matches only 0%"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_header_refusal_is_cheap(case: str, local: Env, models: Models, tmp_path: Path) -> None:  # noqa: F811
    build, needle = CASES[case]
    ok("init")
    ok("base", "add", BASE, str(models.base))
    ok("bundle", "create", BUNDLE, "--base", BASE)
    source = build(tmp_path, models.base)
    before = snapshot_registry_and_store(local.home)
    tracemalloc.start()
    started = time.monotonic()
    try:
        line = refused("fold", BUNDLE, str(source), "--task", "t", needle=needle)
        seconds = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert snapshot_registry_and_store(local.home) == before
    assert seconds < MAX_SECONDS, (seconds, line)
    assert peak < MAX_BYTES, (peak / 2**20, line)

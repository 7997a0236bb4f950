"""The drift check: every version's superposition recomputed from its tasks alone.

A version's master superposition must equal sum_t T_t(delta_t) over the tasks its
manifest lists, each delta taken from the task's source (fetched again by uri and
checked against its recorded digest) and scrambled with the task's seed. A fold of the
wrong bytes, a `remove` that subtracted another delta than the one added, or an
overflow would all show here as a difference of the size of a delta; what remains
after a correct history is float32 rounding of sums taken in another order.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from randes.checkpoint import CheckpointReader
from randes.digests import source_digests
from randes.fold import fold as core_fold
from randes.layout import superposition_dtype
from storage.readers import open_superposition
from storage.settings import Settings
from storage.sources import resolve_source
from storage.workspace import Workspace

RELATIVE_TOLERANCE = 1e-5


def recompute_drift(
    settings: Settings, bundle: str, versions: set[int] | None = None
) -> dict[int, float]:
    """Relative L2 difference (stored vs recomputed master) of every version of
    ``bundle`` (or of ``versions``: those whose sources are all still at their uri)."""
    drift: dict[int, float] = {}
    with Workspace(settings) as ws:
        bundle_rec = ws.registry.get_bundle(bundle)
        for record in ws.registry.list_versions(bundle):
            if versions is not None and record.version not in versions:
                continue
            manifest = ws.manifest(record)
            with (
                tempfile.TemporaryDirectory() as scratch,
                ws.open_base(bundle_rec.base_name) as base,
                open_superposition(ws.files, manifest) as stored,
            ):
                expected = _recompute(ws, base, manifest, Path(scratch))
                if stored is None:
                    assert expected is None, f"version {record.version} lost its superposition"
                    drift[record.version] = 0.0
                    continue
                assert expected is not None, f"version {record.version} has no tasks to sum"
                with expected:
                    drift[record.version] = _relative_difference(stored, expected)
                    assert all(
                        bool(torch.isfinite(stored.get(k)).all())
                        for k in stored.keys()  # noqa: SIM118
                    ), f"version {record.version}: non-finite superposition"
    return drift


def assert_no_drift(
    settings: Settings, bundle: str, versions: set[int] | None = None
) -> dict[int, float]:
    drift = recompute_drift(settings, bundle, versions)
    bad = {v: d for v, d in drift.items() if not d <= RELATIVE_TOLERANCE}
    assert not bad, f"superposition drifted from the sum of its tasks: {bad}"
    return drift


def _recompute(ws: Workspace, base: CheckpointReader, manifest, scratch: Path):  # type: ignore[no-untyped-def]
    reader: CheckpointReader | None = None
    for index, entry in enumerate(manifest.tasks):
        resolved = resolve_source(entry.source_uri, settings=ws.settings)
        with resolved.open() as checkpoint:
            assert entry.source_sha256 in source_digests(checkpoint).all, entry.name
            out = scratch / f"step-{index}"
            result = core_fold(
                base=base,
                checkpoint=checkpoint,
                parent=reader,
                seed=entry.seed,
                config=manifest.transform.model_copy(update={"serving": None}),
                out_dir=out,
            )
        if reader is not None:
            reader.close()
        reader = CheckpointReader.from_files([s.path for s in result.superposition])
    if reader is not None:
        assert all(reader.meta(k).dtype == superposition_dtype(manifest.transform) for k in reader)
    return reader


def _relative_difference(stored: CheckpointReader, expected: CheckpointReader) -> float:
    assert sorted(stored.keys()) == sorted(expected.keys())
    diff = norm = 0.0
    for key in stored.keys():  # noqa: SIM118
        a = stored.get(key).double()
        b = expected.get(key).double()
        diff += float((a - b).square().sum())
        norm += float(b.square().sum())
    return math.sqrt(diff / norm) if norm else math.sqrt(diff)

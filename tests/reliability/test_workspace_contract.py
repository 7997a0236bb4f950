"""Two gaps the bad-input and integrity tests found in `Workspace` itself (the command
line covered them, Python callers and flows did not; see docs/reliability.md):

- `Workspace.pull`, `manifest()` and `base_manifest()` name the bundle version (or the
  base) a damaged object belongs to, like the command line does;
- `Workspace.fold(scale=...)` and `materialize(scale=...)` refuse a scale that is not a
  finite positive number before anything is computed or uploaded.

And one of the leftover sweep added to `gc`: a store refusing it does not fail the gc.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from randes.errors import IntegrityError
from storage.errors import StoreError
from storage.keys import blob_key
from storage.registry import InvalidValueError
from storage.workspace import Workspace
from tests.reliability.conftest import (
    BUNDLE,
    Models,
    Trials,
    make_settings,
    setup_bundle,
    stored_keys,
    tmp_files,
)

pytestmark = pytest.mark.usefixtures("no_randes_env")


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("what", ["superposition", "serving", "version-manifest", "base-shard"])
def test_pull_names_what_a_damaged_object_belongs_to(
    what: str, models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        record, manifest = ws.resolve(BUNDLE)
        base = ws.base_manifest(manifest.base.name)
    key = {
        "superposition": manifest.superposition[0].key,  # pulled with master=True
        "serving": manifest.serving.shards[0].key,  # type: ignore[union-attr]
        "version-manifest": record.manifest_key,
        "base-shard": base.shards[0].key,
    }[what]
    _flip_one_byte(tmp_path / "home" / "store" / key)
    expected = "(base base)" if what == "base-shard" else f"(bundle {BUNDLE} version 1)"
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "empty-cache"})
    dest = tmp_path / "pulled"
    with Workspace(fresh) as ws, pytest.raises(IntegrityError) as info:
        ws.pull(BUNDLE, None, dest, master=what == "superposition")
    message = str(info.value)
    assert key in message and message.endswith(expected), message
    assert "\n" not in message
    assert not dest.exists() and not list(tmp_path.glob(".pulled*"))
    trials.record("damaged object: error names its version (Workspace API)", what)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -1.0, 0.0])
def test_fold_and_materialize_refuse_a_bad_scale_before_writing(
    scale: float, models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        before = stored_keys(ws)
        with pytest.raises(InvalidValueError, match="scale"):
            ws.fold(BUNDLE, str(models.tasks["t1"]), "t1", scale=scale)
        with pytest.raises(InvalidValueError, match="scale"):
            ws.materialize(BUNDLE, None, "t0", tmp_path / "model", scale=scale)
        assert stored_keys(ws) == before
        assert ws.registry.leased_keys() == set()
        assert ws.registry.head(BUNDLE).version == 1  # type: ignore[union-attr]
        assert tmp_files(tmp_path / "home") == []
        assert not (tmp_path / "model").exists()
    trials.record("bad scale refused before writing (Workspace API)", str(scale), tried=2)


def test_gc_completes_when_the_store_refuses_to_sweep_leftovers(
    models: Models, tmp_path: Path, trials: Trials
) -> None:
    """A bucket policy without s3:ListBucketMultipartUploads must not fail a `gc`
    whose deletions are done: the leftovers are swept by a later run."""
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        orphan = blob_key(hashlib.sha256(b"left by a failed run").hexdigest())
        ws.store.put_bytes(orphan, b"left by a failed run")

        def refuse(older_than: float, *, keep: object = ()) -> int:
            raise StoreError("list uploads s3://b/randes: access denied (AccessDenied)")

        ws.store.sweep_incomplete = refuse  # type: ignore[method-assign]
        report = ws.gc(grace_s=0)
        assert report.deleted == [orphan] and report.swept == 0
        assert stored_keys(ws) == ws.registry.referenced_keys()
    trials.record("gc with a store refusing the leftover sweep", "access denied")

"""Bundle-level invariants of one version, checked by `randes validate` before any task.

Per-task validation measures models; these say whether the version is whole at all:

- every object the version references (its superposition, serving copy, private
  tensors, side files, the base's shards and files) is in the store with its size;
- the superposition has exactly the base layout's slots, base-shaped, in the bundle
  dtype, and every slot is finite; so is every value the serving copy decodes to and
  every private tensor.

The validation gate applies them: a version that breaks one is rejected whatever its
tasks score, with the problems listed in the report. A fold already refuses to write a
non-finite slot; this catches what reached the store by other ways (an older release,
a hand-made manifest, a store edited behind the pipeline's back).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from randes.errors import RandesError
from randes.layout import check_superposition, layout_of
from randes.manifest import BundleManifest, ShardRef
from randes.source import TensorSource
from storage.cache import version_context
from storage.errors import ObjectNotFoundError
from storage.readers import open_base, open_refs, open_served, open_superposition
from storage.wiring import Wiring

MAX_PROBLEMS = 20
"""Problems reported per version (the first ones; the rest are counted)."""


def version_problems(ws: Wiring, manifest: BundleManifest) -> list[str]:
    """Every broken invariant of ``manifest``'s version, one short line each ([] if whole)."""
    problems: list[str] = []
    base = ws.base_manifest(manifest.base.name)
    refs = [*manifest.shards(), *base.shards, *base.files.values()]
    problems += _missing_objects(ws, refs)
    if problems:  # reading what is missing would only fail again
        return _capped(problems)
    context = version_context(manifest.bundle, manifest.version)
    # A damaged object (sha256 mismatch) is not caught here: it fails the command with
    # the one line naming its key and this version, as every other reader does.
    files = ws.files
    with open_base(files, ws.base_of(manifest)) as base_reader:
        with open_superposition(files, manifest) as master:
            if master is not None:
                try:
                    check_superposition(
                        base_reader, master, layout_of(base_reader, manifest.transform)
                    )
                except RandesError as exc:
                    problems.append(f"master superposition: {exc}")
                problems += _non_finite("master slot", master)
        if manifest.serving is not None:
            with open_served(files, manifest, base_reader, master=False) as served:
                if served is not None:
                    problems += _non_finite("serving copy of slot", served)
    for entry in manifest.tasks:
        with open_refs(files, entry.private, context) as private:
            if private is not None:
                problems += _non_finite(f"task {entry.name!r} private tensor", private)
    return _capped(problems)


def _missing_objects(ws: Wiring, refs: Iterable[ShardRef]) -> list[str]:
    problems = []
    for ref in {r.key: r for r in refs}.values():
        try:
            info = ws.store.stat(ref.key)
        except ObjectNotFoundError:
            problems.append(f"object {ref.key} is missing from the store")
            continue
        if info.size != ref.size:
            problems.append(f"object {ref.key} is {info.size} bytes, the manifest says {ref.size}")
    return problems


def _non_finite(what: str, reader: TensorSource) -> list[str]:
    problems = []
    for name in reader.keys():  # noqa: SIM118 - sorted names, the reader's stable order
        tensor = reader.get(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            problems.append(f"{what} {name!r} holds NaN or Inf")
    return problems


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return [*problems[:MAX_PROBLEMS], f"... and {len(problems) - MAX_PROBLEMS} more"]

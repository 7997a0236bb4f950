"""Opening what a task is rebuilt from, wherever a version's objects lie.

A version is read in three places: from the store through the local cache (fold,
materialize, validate, invariants), from a directory written by `randes pull`
(`storage.pulled`, offline), and from the source a task was folded from (remove,
validation's fidelity measure). The readers are the same in all of them; only where a
verified local file of an object comes from differs, and that is `ObjectFiles`:

- `CacheFiles`: the store's objects through `storage.cache.ObjectCache`;
- `storage.pulled.PulledFiles`: the objects of a pulled directory.

Every object is checked against the sha256 its manifest records before it is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from randes.checkpoint import CheckpointReader
from randes.digests import source_digests
from randes.errors import IntegrityError
from randes.layout import superposition_metas
from randes.manifest import BaseManifest, BundleManifest, ShardRef, TaskEntry
from randes.materialize import materialize as materialize_model
from randes.scaling import manifest_task_scale
from randes.serving import QuantizedReader
from randes.source import TensorSource
from storage.cache import ObjectCache, version_context
from storage.registry import TaskNotFoundError
from storage.settings import Settings
from storage.sources import resolve_source


class ObjectFiles(Protocol):
    """Where verified local copies of a version's objects come from."""

    def tensor_file(self, ref: ShardRef, context: str) -> Path:
        """A verified local copy of a safetensors object, named so readers open it."""
        ...

    def side_file(self, ref: ShardRef, context: str) -> Path:
        """A verified local copy of a side file (config.json, tokenizer...)."""
        ...


@dataclass(frozen=True)
class CacheFiles:
    """The store's objects, through the verifying local cache."""

    cache: ObjectCache

    def tensor_file(self, ref: ShardRef, context: str) -> Path:
        return self.cache.fetch(ref, context=context)

    def side_file(self, ref: ShardRef, context: str) -> Path:
        return self.cache.fetch(ref, context=context, suffix="")


@dataclass(frozen=True)
class OpenTask:
    """Readers of one task of one version (see `open_task`)."""

    entry: TaskEntry
    base: CheckpointReader
    superposition: TensorSource | None
    private: CheckpointReader | None
    side_files: dict[str, Path]


@contextlib.contextmanager
def open_refs(
    files: ObjectFiles, refs: Sequence[ShardRef], context: str
) -> Iterator[CheckpointReader | None]:
    """One reader over the safetensors objects ``refs`` (None when there are none)."""
    if not refs:
        yield None
        return
    paths = [files.tensor_file(ref, context) for ref in refs]
    with CheckpointReader.from_files(paths) as reader:
        yield reader


@contextlib.contextmanager
def open_base(files: ObjectFiles, base: BaseManifest) -> Iterator[CheckpointReader]:
    """A verified reader of a registered base (a base has at least one shard)."""
    with open_refs(files, base.shards, f"base {base.name}") as reader:
        assert reader is not None
        yield reader


def check_base(base: BaseManifest, manifest: BundleManifest) -> BaseManifest:
    """``base`` when it is the base ``manifest`` was built on; IntegrityError otherwise."""
    if base.sha256 != manifest.base.sha256:
        raise IntegrityError(
            f"base {base.name!r} in the registry is not the base bundle "
            f"{manifest.bundle!r} was built on"
        )
    return base


def open_superposition(
    files: ObjectFiles, manifest: BundleManifest | None
) -> contextlib.AbstractContextManager[CheckpointReader | None]:
    """The fp32 master superposition of a version (None: no version, or no tasks)."""
    if manifest is None:
        return contextlib.nullcontext(None)
    return open_refs(
        files, manifest.superposition, version_context(manifest.bundle, manifest.version)
    )


@contextlib.contextmanager
def open_served(
    files: ObjectFiles, manifest: BundleManifest, base: CheckpointReader, *, master: bool
) -> Iterator[TensorSource | None]:
    """The superposition a version serves: its quantized copy when it has one (unless
    ``master``), read as the master it was derived from; else the master itself."""
    if master or manifest.serving is None:
        with open_superposition(files, manifest) as reader:
            yield reader
        return
    serving = manifest.serving
    context = version_context(manifest.bundle, manifest.version)
    with open_refs(files, serving.shards, context) as inner:
        assert inner is not None  # a ServingArtifact has at least one shard
        metas = superposition_metas(base, manifest.transform)
        with QuantizedReader(inner, serving.scheme, metas) as reader:
            yield reader


@contextlib.contextmanager
def open_task(
    files: ObjectFiles,
    manifest: BundleManifest,
    base: BaseManifest,
    task: str,
    *,
    master: bool = False,
) -> Iterator[OpenTask]:
    """Verified local readers for everything one task of a version is rebuilt from.

    What materialize writes and what validation measures come from here, so both read
    (and sha256-check) exactly the same objects: the base, the served superposition,
    the task's private tensors and its side files (config.json).
    """
    try:
        entry = manifest.task(task)
    except KeyError:
        raise TaskNotFoundError(manifest.bundle, task) from None
    context = version_context(manifest.bundle, manifest.version)
    side = {n: files.side_file(r, context) for n, r in entry.files.items()}
    with (
        open_base(files, base) as base_reader,
        open_served(files, manifest, base_reader, master=master) as superposition,
        open_refs(files, entry.private, context) as private,
    ):
        yield OpenTask(entry, base_reader, superposition, private, side)


def write_task(
    opened: OpenTask,
    manifest: BundleManifest,
    base: BaseManifest,
    out_dir: Path,
    *,
    scale: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write the task ``opened`` holds as a standalone model directory into ``out_dir``,
    at ``scale`` or else the lambda its manifest implies (`manifest_task_scale`)."""
    materialize_model(
        base=opened.base,
        superposition=opened.superposition,
        private=opened.private,
        seed=opened.entry.seed,
        key_map=opened.entry.key_map,
        config=manifest.transform,
        scale=scale
        if scale is not None
        else manifest_task_scale(manifest, opened.entry, opened.base, base.norms),
        out_dir=out_dir,
        side_files=opened.side_files,
        progress=progress,
        weights_dir=opened.entry.weights_dir,
    )


def open_task_source(entry: TaskEntry, settings: Settings) -> CheckpointReader:
    """The checkpoint ``entry`` was folded from, fetched again by its uri and checked
    against its sha256 (IntegrityError when it changed since: it cannot be removed or
    measured against exactly). The caller closes it."""
    reader = resolve_source(entry.source_uri, settings=settings).open()
    try:
        # the file-bytes digest (a task folded before content digests) only when needed
        if entry.source_sha256 != source_digests(reader, legacy=False).content and (
            entry.source_sha256 != source_digests(reader).legacy
        ):
            raise IntegrityError(
                f"source of task {entry.name!r} ({entry.source_uri}) changed since it was "
                "folded; cannot remove it exactly"
            )
    except BaseException:
        reader.close()
        raise
    return reader

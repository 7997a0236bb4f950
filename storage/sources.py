"""Resolve a checkpoint SOURCE (local path, s3://, hf://) to local files and a pinned uri.

The uri recorded in the registry must name exactly the bytes that were folded, so
that `randes remove` can fetch them again: a Hugging Face revision is pinned to the
commit it resolved to, and every source is checked against its sha256 on re-fetch.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from randes.checkpoint import PICKLE_SUFFIXES, CheckpointReader
from randes.errors import CheckpointError, UnsafeCheckpointError
from storage.redact import redact_s3_debug_logs
from storage.settings import Settings

if TYPE_CHECKING:
    from storage.store import ObjectStore
    from storage.store.base import ObjectInfo

WANTED_SUFFIXES = (".safetensors", ".json")
_HF = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint available on local disk, with the uri that names it for good."""

    uri: str
    path: Path
    root: Path | None = None
    """The directory no file of the checkpoint may lie outside of, links resolved
    (`randes.checkpoint.confined`); None: the checkpoint's own directory."""

    def open(self) -> CheckpointReader:
        """The checkpoint's reader, every file it reads confined to ``root``."""
        return CheckpointReader.open(self.path, confine_to=self.root)


def resolve_source(source: str, *, settings: Settings) -> ResolvedSource:
    """Bring ``source`` to local disk (no-op for local paths) and pin its uri."""
    if source.startswith("s3://"):
        return _resolve_s3(source, settings)
    if source.startswith("hf://"):
        return _resolve_hf(source)
    if "://" in source and not source.startswith("file://"):
        raise CheckpointError(f"unsupported source {source!r}: use a path, s3:// or hf://")
    try:
        if source.startswith("file://"):
            # a recorded uri (Path.as_uri) percent-encodes spaces and accents: decode it
            path = Path(url2pathname(urlsplit(source).path))
        else:
            path = Path(source).expanduser()
        if not path.exists():
            raise CheckpointError(f"no such file or directory: {_short(str(path))}")
        path = path.resolve()
    except (OSError, RuntimeError) as exc:  # name too long, symlink loop, no home dir...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"cannot use source {_short(source)}: {reason}") from None
    return ResolvedSource(uri=path.as_uri(), path=path)


def _short(text: str, limit: int = 160) -> str:
    """A user-given path or uri, cut so that an error about it stays one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_hf_uri(uri: str) -> tuple[str, str | None]:
    match = _HF.fullmatch(uri)
    if not match:
        raise CheckpointError(f"invalid Hugging Face source {uri!r}: use hf://org/repo[@revision]")
    return match["repo"], match["rev"]


def _resolve_hf(source: str) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = split_hf_uri(source)
    try:
        local = Path(
            snapshot_download(
                repo_id=repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"]
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{source}: not in the local Hugging Face cache and the hub cannot be reached"
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointError(
            f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    commit = local.name  # snapshots/<commit sha>
    # The cache links snapshots/<commit>/<file> to blobs/<sha>: both under the repo's folder.
    return ResolvedSource(uri=f"hf://{repo_id}@{commit}", path=local, root=local.parent.parent)


def open_configured_store(url: str, settings: Settings) -> ObjectStore:
    """The store at ``url`` with the S3 options of ``settings`` (endpoint, region, retries)."""
    from storage.store import S3Store, open_store

    if url.startswith("s3://"):
        redact_s3_debug_logs()

    store = open_store(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
    if settings.s3_retry_seconds is not None and isinstance(store, S3Store):
        store.retry_timeout = settings.s3_retry_seconds  # rebuilds its botocore retry config
    return store


def _resolve_s3(source: str, settings: Settings) -> ResolvedSource:
    """Download an S3 checkpoint (one object, or the files of one prefix) to the cache.

    The local copy is keyed by what the store says of the objects NOW (key, size, ETag,
    last-modified), never by the uri alone: a checkpoint replaced under the same uri
    gets a fresh copy, and leftovers of an older one (a shard set replaced by a single
    file) can never be folded. A copy is built in a private directory and renamed into
    place whole, so a concurrent or killed download never leaves a mixed one.
    """
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket:
        raise CheckpointError(f"invalid S3 source {_short(source)!r}: use s3://bucket/key")
    store = open_configured_store(f"s3://{bucket}", settings)
    key = key.strip("/")
    prefix = f"{key}/" if key else ""
    objects = [info for info in store.list(prefix) if info.key != prefix]
    if key and not objects:
        if not store.exists(key):
            raise CheckpointError(f"no such S3 object or prefix: {_short(source)}")
        if key.endswith(PICKLE_SUFFIXES):
            raise UnsafeCheckpointError(
                f"{_short(source)}: pickle checkpoints are refused (they can run code)"
            )
        info = store.stat(key)
        copy = _cached_copy(store, source, [(info, PurePosixPath(key).name)], settings)
        return ResolvedSource(uri=source, path=copy / PurePosixPath(key).name)
    if not objects:
        raise CheckpointError(f"no such S3 object or prefix: {_short(source)}")
    named = [(info, info.key[len(prefix) :]) for info in objects]
    wanted = [(i, n) for i, n in named if "/" not in n and n.endswith(WANTED_SUFFIXES)]
    if not any(n.endswith(".safetensors") for _, n in wanted):
        if any(n.endswith(PICKLE_SUFFIXES) for _, n in named):
            raise UnsafeCheckpointError(
                f"{_short(source)}: only pickle checkpoints found; they are refused (they "
                "can run code)"
            )
        raise CheckpointError(f"{_short(source)}: no .safetensors file under this prefix")
    copy = _cached_copy(store, source, wanted, settings)
    return ResolvedSource(uri=source.rstrip("/"), path=copy)


def _cached_copy(
    store: ObjectStore, source: str, objects: list[tuple[ObjectInfo, str]], settings: Settings
) -> Path:
    """cache/sources/<sha(uri)>/<sha(listing)>: the listed objects, downloaded once."""
    listing = hashlib.sha256()
    for info, name in sorted(objects, key=lambda pair: pair[1]):
        stamp = f"{name}\0{info.size}\0{info.etag or ''}\0{info.last_modified.isoformat()}\n"
        listing.update(stamp.encode("utf-8", "surrogateescape"))
    parent = settings.resolved_cache_dir / "sources" / hashlib.sha256(source.encode()).hexdigest()
    target = parent / listing.hexdigest()
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".tmp-"))
    try:
        for info, name in objects:
            store.get_file(info.key, staging / name, sha256=None)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else a concurrent download of the same listing won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in parent.iterdir():  # copies of what the uri named before: never used again
        if stale != target and not stale.name.startswith(".tmp-"):
            shutil.rmtree(stale, ignore_errors=True)
    return target

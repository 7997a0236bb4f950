"""Find the checkpoints under an ingestion source, one per task.

Layouts understood (the task name is the folder or repository name):

- a local directory of task folders: ``SRC/<task>/model.safetensors`` (or sharded);
- an S3 prefix of task folders: ``s3://bucket/prefix/<task>/...``;
- Hugging Face repositories: ``hf://org/repo[@rev]``, several separated by commas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from randes.errors import CheckpointError, InvalidNameError
from randes.names import validate_name
from storage.settings import Settings
from storage.sources import open_configured_store, split_hf_uri


@dataclass(frozen=True)
class Candidate:
    task: str
    source: str
    refusal: str | None = None
    """Why this checkpoint cannot be folded (a folder name that is no valid task name):
    the ingest flow refuses it and folds the others, as it does for bad checkpoints."""


def _candidate(name: str, source: str) -> Candidate:
    try:
        return Candidate(validate_name(name, "task name"), source)
    except InvalidNameError as exc:
        return Candidate(name, source, refusal=str(exc))


def discover(source: str, *, settings: Settings) -> list[Candidate]:
    """Every (task, source) pair found under ``source``, sorted by task name."""
    if source.startswith("hf://"):
        found = [_hf_candidate(part.strip()) for part in source.split(",") if part.strip()]
    elif source.startswith("s3://"):
        found = _s3_candidates(source, settings)
    else:
        found = _local_candidates(Path(source.removeprefix("file://")).expanduser())
    names = [c.task for c in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CheckpointError(f"{source}: several checkpoints for task(s) {', '.join(duplicates)}")
    return sorted(found, key=lambda c: c.task)


def _hf_candidate(uri: str) -> Candidate:
    repo, _ = split_hf_uri(uri)
    return Candidate(task=validate_name(repo.rsplit("/", 1)[-1], "task name"), source=uri)


def _local_candidates(root: Path) -> list[Candidate]:
    if not root.is_dir():
        raise CheckpointError(f"ingestion source is not a directory: {root}")
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and any(child.glob("*.safetensors")):
            found.append(_candidate(child.name, str(child.resolve())))
        elif child.is_file() and child.suffix == ".safetensors":
            found.append(_candidate(child.stem, str(child.resolve())))
    return found


def _s3_candidates(source: str, settings: Settings) -> list[Candidate]:
    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    store = open_configured_store(f"s3://{bucket}", settings)
    listing_prefix = f"{prefix}/" if prefix else ""
    tasks: set[str] = set()
    for info in store.list(listing_prefix):
        rest = info.key[len(listing_prefix) :]
        folder, sep, name = rest.partition("/")
        if sep and name.endswith(".safetensors"):
            tasks.add(folder)
    base = f"s3://{bucket}/{listing_prefix}"
    return [_candidate(t, f"{base}{t}") for t in sorted(tasks)]

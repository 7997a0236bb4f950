"""The bundle format: JSON manifests that name content-addressed safetensors shards.

A version's manifest is the whole truth about it: which shards hold the superposition,
which tasks it contains with their seeds and scales, and the sha256 of every byte it
references. Manifests are immutable; version n+1 gets a new one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from randes.config import TransformConfig, with_stored_map
from randes.errors import ManifestError
from randes.quantize import QuantScheme

FORMAT_VERSION = 1

_M = TypeVar("_M", bound=BaseModel)

_SHA256 = r"^[0-9a-f]{64}$"
_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def _safe_key(key: str) -> str:
    """An object key a manifest may name: '/'-separated plain components.

    Readers join keys to local directories (`randes pull` writes ``DEST/<key>``), so a
    manifest must never be able to name ``../x``, ``/etc/x`` or a control character.
    """
    if not all(_KEY_PART.fullmatch(part) for part in key.split("/")):
        raise ValueError("must be '/'-separated plain names (letters, digits, '._-')")
    return key


def _safe_file_name(name: str) -> str:
    """A side-file name (``config.json``): written as ``DEST/<name>`` by materialize."""
    if not _FILE_NAME.fullmatch(name):
        raise ValueError("side file names must be plain file names")
    return name


SafeKey = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_safe_key)]
FileName = Annotated[str, AfterValidator(_safe_file_name)]


class ShardRef(BaseModel):
    """One stored file: its object key, size and sha256, and the tensors inside it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SafeKey
    sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0, le=2**63 - 1)
    tensors: list[str] = Field(default_factory=list)


class KeyMap(BaseModel):
    """How a checkpoint's tensor names relate to the base's.

    ``checkpoint_name = checkpoint_prefix + base_name[len(base_prefix):]``. Both empty
    means identical names. Recorded so that materialize restores the fine-tune's names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_prefix: str = ""
    checkpoint_prefix: str = ""

    def to_checkpoint(self, base_name: str) -> str:
        return self.checkpoint_prefix + base_name[len(self.base_prefix) :]

    def to_base(self, checkpoint_name: str) -> str | None:
        """The base name of a checkpoint tensor, or None when it is outside the prefix."""
        if not checkpoint_name.startswith(self.checkpoint_prefix):
            return None
        return self.base_prefix + checkpoint_name[len(self.checkpoint_prefix) :]


class BaseRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    uri: str
    sha256: str = Field(pattern=_SHA256)
    manifest_key: SafeKey
    manifest_sha256: str = Field(pattern=_SHA256)


class TaskEntry(BaseModel):
    """One task folded into a version: everything needed to retrieve or remove it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    seed: int = Field(ge=0, lt=2**63)
    source_uri: str
    source_sha256: str = Field(pattern=_SHA256)
    added_in_version: int = Field(ge=1)
    scale: float | None = Field(default=None, gt=0)
    key_map: KeyMap = Field(default_factory=KeyMap)
    delta_norms: dict[str, float] = Field(default_factory=dict)
    private: list[ShardRef] = Field(default_factory=list)
    files: dict[FileName, ShardRef] = Field(
        default_factory=dict, description="Side files of the source kept verbatim (config.json)."
    )


class BaseManifest(BaseModel):
    """A registered base model, stored once and shared by every bundle on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    uri: str
    sha256: str = Field(pattern=_SHA256)
    shards: list[ShardRef]
    files: dict[FileName, ShardRef] = Field(default_factory=dict)
    norms: dict[str, float] = Field(default_factory=dict)


class ServingArtifact(BaseModel):
    """The quantized copy of a version's superposition, what pull / materialize serve.

    Derived from that version's fp32 master when it was written (never folded into, so
    no quantization error accumulates across versions); ``shards`` hold ``<slot>.q``
    codes and ``<slot>.scale`` scales as `randes.quantize` lays them out.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: QuantScheme
    shards: list[ShardRef] = Field(min_length=1)


class BundleManifest(BaseModel):
    """One immutable bundle version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    bundle: str
    version: int = Field(ge=0)
    parent_version: int | None = None
    created_at: str
    base: BaseRef
    transform: TransformConfig
    superposition: list[ShardRef] = Field(default_factory=list)
    tasks: list[TaskEntry] = Field(default_factory=list)
    serving: ServingArtifact | None = Field(
        default=None,
        description="Quantized superposition served by default; None (versions without "
        "tasks, bundles serving the master, manifests older than it) serves the master.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_map(cls, data: Any) -> Any:
        """Manifests written before TransformConfig.map existed hold column flips."""
        if isinstance(data, dict) and isinstance(data.get("transform"), dict):
            data = {**data, "transform": with_stored_map(data["transform"])}
        return data

    def task(self, name: str) -> TaskEntry:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def shards(self) -> Iterator[ShardRef]:
        """Every stored file this version references (superposition, serving copy,
        privates, side files): what gc keeps and integrity checks cover."""
        yield from self.superposition
        if self.serving is not None:
            yield from self.serving.shards
        for entry in self.tasks:
            yield from entry.private
            yield from entry.files.values()


def dump_manifest(manifest: BaseModel) -> bytes:
    """Canonical bytes: sorted keys, so equal manifests hash equally."""
    return manifest.model_dump_json(indent=None).encode("utf-8")


def _clip(text: str, limit: int = 160) -> str:
    """Part of an error message that may quote the manifest: one short line at most."""
    text = text.replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_bundle_manifest(data: bytes) -> BundleManifest:
    return _load(BundleManifest, data)


def load_base_manifest(data: bytes) -> BaseManifest:
    return _load(BaseManifest, data)


def _load(model: type[_M], data: bytes) -> _M:
    try:
        parsed = model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = _clip(".".join(str(p) for p in first.get("loc", ())))
        message = _clip(str(first.get("msg")))
        raise ManifestError(f"invalid {model.__name__}: {where}: {message}") from None
    except ValueError as exc:  # pragma: no cover - defensive, pydantic wraps JSON errors
        raise ManifestError(f"invalid {model.__name__}: {exc}") from None
    if parsed.format_version != FORMAT_VERSION:  # type: ignore[attr-defined]
        raise ManifestError(
            f"unsupported format_version {parsed.format_version}"  # type: ignore[attr-defined]
        )
    return parsed

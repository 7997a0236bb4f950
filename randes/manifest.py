"""The bundle format: JSON manifests that name content-addressed safetensors shards.

A version's manifest is the whole truth about it: which shards hold the superposition,
which tasks it contains with their seeds and scales, and the sha256 of every byte it
references. Manifests are immutable; version n+1 gets a new one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from randes.config import TransformConfig
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


_MAX_FILE_DEPTH = 8


def _safe_file_name(name: str) -> str:
    """A side-file path (``config.json``, ``1_Pooling/config.json``): written as
    ``DEST/<name>`` by materialize, so only '/'-separated plain names, a few levels deep."""
    parts = name.split("/")
    if len(parts) > _MAX_FILE_DEPTH or not all(_FILE_NAME.fullmatch(p) for p in parts):
        raise ValueError("side file names must be '/'-separated plain file names")
    return name


def _safe_dir(name: str) -> str:
    """A weights subfolder (``0_Transformer``), or "" for the model's root."""
    return _safe_file_name(name) if name else name


SafeKey = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_safe_key)]
FileName = Annotated[str, AfterValidator(_safe_file_name)]
DirName = Annotated[str, AfterValidator(_safe_dir)]


class ShardRef(BaseModel):
    """One stored file: its object key, size and sha256, and the tensors inside it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SafeKey
    sha256: str = Field(pattern=_SHA256)
    size: int = Field(ge=0, le=2**63 - 1)
    tensors: list[str] = Field(default_factory=list)


class KeyMap(BaseModel):
    """How a fine-tune's tensors relate to the base's: the reconciliation of one task.

    ``checkpoint_name = checkpoint_prefix + base_name[len(base_prefix):]``. Both empty
    means identical names. Checkpoint names are the fine-tune's after training wrappers
    (``module.``, ``_orig_mod.``) are stripped. Recorded so that materialize writes what
    the fine-tune's own loader expects: its names, no tensor it did not have, its dtypes
    (see randes.keymap for the decision table). Every field defaults to what manifests
    written before it meant.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_prefix: str = ""
    checkpoint_prefix: str = ""
    wrappers: tuple[str, ...] = Field(
        default=(), description="Training-wrapper prefixes stripped from the checkpoint."
    )
    absent: tuple[str, ...] = Field(
        default=(),
        description="Base tensors (base names) the fine-tune lacks: no delta, not materialized.",
    )
    tied: dict[str, str] = Field(
        default_factory=dict,
        description="Absent tensors the fine-tune's config.json ties to another "
        "(checkpoint names: tied -> source); its loader re-ties them.",
    )
    dtypes: dict[str, str] = Field(
        default_factory=dict,
        description="The fine-tune's dtype where it differs from the base's, per base "
        "tensor name; '*' for every float tensor not named.",
    )

    def to_checkpoint(self, base_name: str) -> str:
        return self.checkpoint_prefix + base_name[len(self.base_prefix) :]

    def to_base(self, checkpoint_name: str) -> str | None:
        """The base name of a checkpoint tensor, or None when it is outside the prefix."""
        if not checkpoint_name.startswith(self.checkpoint_prefix):
            return None
        return self.base_prefix + checkpoint_name[len(self.checkpoint_prefix) :]

    def dtype_name(self, base_name: str) -> str | None:
        """The fine-tune's dtype name of a float base tensor, None when it is the base's."""
        return self.dtypes.get(base_name, self.dtypes.get("*"))


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
        default_factory=dict,
        description="Side files of the source kept verbatim, by path relative to the model "
        "directory (config.json, tokenizer, 1_Pooling/config.json...).",
    )
    source_kind: Literal["checkpoint", "peft-lora"] = Field(
        default="checkpoint",
        description="'peft-lora': the task came from a PEFT LoRA adapter, folded as its "
        "dense delta; it materializes as the merged model.",
    )
    weights_dir: DirName = Field(
        default="",
        description="Subfolder that holds the weights in the source's layout "
        "(sentence-transformers' legacy '0_Transformer'); '' for the root.",
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

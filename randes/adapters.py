"""PEFT LoRA adapters as a source: folded as the dense delta they stand for.

A LoRA adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``, as
``PeftModel.save_pretrained`` writes it) holds, per target module ``X``, two small
matrices; the fine-tune it stands for is the base with ``X.weight += B @ A * scaling``
(what ``merge_and_unload`` computes). `as_dense` presents that merged model as a
checkpoint, tensor by tensor: a target is the base's tensor plus its delta (computed in
float32 from A and B when asked for, one at a time), every other tensor the base's own
(zero delta). So fold, capacity and validation read adapters exactly as dense
fine-tunes, and the task materializes as the merged model.

- scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; ``rank_pattern`` and
  ``alpha_pattern`` override r and alpha per module, matched as PEFT matches them;
- ``fan_in_fan_out`` (GPT-2's Conv1D stores weights as in x out): the delta is
  transposed; LoRA on embeddings (``lora_embedding_A/B``): (B @ A)^T;
- names lose PEFT's ``base_model.model.`` wrapper; full tensors the adapter saved
  (``modules_to_save`` heads, biases) are the task's private tensors; a saved
  ``X.base_layer.weight`` stands in for the base's ``X.weight``;
- anything else (DoRA, IA3, LoHa, LoRA biases, convolutions...) is refused with one line
  saying it is not supported yet.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from randes.checkpoint import CheckpointReader
from randes.errors import CheckpointError, IncompatibleCheckpointError
from randes.keymap import detect_key_map
from randes.source import NamedView, TensorMeta, TensorSource

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 4 * 1024 * 1024
SourceKind = Literal["checkpoint", "peft-lora"]
_LORA = re.compile(r"^(?P<module>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")
_BASE_LAYER = ".base_layer.weight"
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA",
}


def is_adapter(reader: CheckpointReader) -> bool:
    """Whether ``reader`` opened a PEFT adapter directory."""
    return ADAPTER_CONFIG in reader.side_files and [p.name for p in reader.files] == [
        ADAPTER_WEIGHTS
    ]


def as_dense(reader: CheckpointReader, base: TensorSource) -> TensorSource:
    """``reader`` itself, or the merged model a PEFT LoRA adapter stands for over ``base``."""
    if not is_adapter(reader):
        return reader
    return LoraDense(reader, base, read_adapter_config(reader))


def read_adapter_config(reader: CheckpointReader) -> dict[str, Any]:
    path = reader.side_files[ADAPTER_CONFIG]
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path}: adapter config too large")
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: unreadable adapter config") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: adapter config is not a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(
            f"{path}: PEFT adapter type {str(kind)[:40]!r} is not supported yet (LoRA is)"
        )
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise CheckpointError(f"{path}: {what} adapters are not supported yet")
    return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: exact name, else a pattern matching a name suffix."""
    for key, value in patterns.items():
        if key == module or re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


@dataclass(frozen=True)
class _Target:
    a: str
    b: str
    embedding: bool
    scaling: float


class LoraDense(NamedView):
    """The merged model of one LoRA adapter over one base, as a tensor source.

    Names are the adapter's model's (``base_model.model.`` stripped); the base's names
    are matched to them by the same prefix search as a dense fine-tune's.
    """

    def __init__(self, adapter: CheckpointReader, base: TensorSource, config: dict[str, Any]):
        self.adapter = adapter
        self.base = base
        self.config = config
        raw = {self._strip(n): n for n in adapter.keys()}  # noqa: SIM118
        pieces: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        base_layers: dict[str, str] = {}
        for name, original in raw.items():
            if "lora_magnitude_vector" in name:
                raise CheckpointError(f"{adapter.files[0]}: DoRA adapters are not supported yet")
            m = _LORA.match(name)
            if m is not None:
                part = (m.group("lin") or m.group("emb") or "")[-1]
                pieces.setdefault(m.group("module"), {})[part] = original
                if m.group("emb"):
                    pieces[m.group("module")]["emb"] = "1"
            elif name.endswith(_BASE_LAYER):
                base_layers[name[: -len(_BASE_LAYER)] + ".weight"] = original
            elif ".lora_" in name:
                raise CheckpointError(
                    f"{adapter.files[0]}: adapter tensor {name!r} is of a LoRA kind not "
                    "supported yet"
                )
            else:
                full[name] = original
        fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        alpha = float(config.get("lora_alpha", 8))
        rank = int(config.get("r", 8))
        self.targets: dict[str, _Target] = {}
        target_metas: dict[str, TensorMeta] = {}
        for module, parts in sorted(pieces.items()):
            if "A" not in parts or "B" not in parts:
                raise CheckpointError(f"{adapter.files[0]}: LoRA module {module!r} lacks A or B")
            a_meta, b_meta = adapter.meta(parts["A"]), adapter.meta(parts["B"])
            if len(a_meta.shape) != 2 or len(b_meta.shape) != 2:
                raise CheckpointError(
                    f"{adapter.files[0]}: LoRA module {module!r} is not a linear or embedding "
                    "layer (convolutions are not supported yet)"
                )
            r = int(_pattern_value(config.get("rank_pattern") or {}, module, rank))
            a = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
            scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
            embedding = "emb" in parts
            shape = (b_meta.shape[0], a_meta.shape[1])
            if embedding or fan_in_fan_out:
                shape = (shape[1], shape[0])
            name = f"{module}.weight"
            self.targets[name] = _Target(parts["A"], parts["B"], embedding, scaling)
            target_metas[name] = TensorMeta(dtype=a_meta.dtype, shape=shape)
        if not self.targets:
            raise CheckpointError(f"{adapter.files[0]}: adapter holds no LoRA matrices")

        base_metas = {n: base.meta(n) for n in base.keys()}  # noqa: SIM118
        key_map, _ = detect_key_map(base_metas, target_metas)
        self.names: dict[str, str | None] = {}  # adapter-space name -> base name
        for b in base_metas:
            if b.startswith(key_map.base_prefix):
                self.names[key_map.to_checkpoint(b)] = b
        for name, meta in target_metas.items():
            b_name = self.names.get(name)
            if b_name is None or base_metas[b_name].shape != meta.shape:
                raise IncompatibleCheckpointError(
                    f"adapter targets {name!r} {list(meta.shape)}, which the base does not have"
                )
        self.full = full
        self.base_layers = base_layers
        for name in full:
            self.names.setdefault(name, None)
        self.forced_private = frozenset(full)

    @staticmethod
    def _strip(name: str) -> str:
        return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name

    def meta(self, name: str) -> TensorMeta:
        if name in self.full:
            return self.adapter.meta(self.full[name])
        base_name = self.names[name]
        assert base_name is not None
        return self.base.meta(base_name)

    def get(self, name: str) -> torch.Tensor:
        if name in self.full:
            return self.adapter.get(self.full[name])
        base_name = self.names[name]
        assert base_name is not None
        if name in self.base_layers:
            value = self.adapter.get(self.base_layers[name]).to(self.base.meta(base_name).dtype)
        else:
            value = self.base.get(base_name)
        target = self.targets.get(name)
        if target is None:
            return value
        return value.to(torch.float32).add_(self.delta(name)).to(value.dtype)

    def delta(self, name: str) -> torch.Tensor:
        """B @ A * scaling of one target, float32, in the layout of its weight."""
        target = self.targets[name]
        a = self.adapter.get(target.a).to(torch.float32)
        b = self.adapter.get(target.b).to(torch.float32)
        delta = (b @ a).mul_(target.scaling)
        if target.embedding or self.config.get("fan_in_fan_out"):
            delta = delta.T.contiguous()
        return delta


def task_side_files(reader: CheckpointReader) -> tuple[SourceKind, dict[str, Path]]:
    """(source kind, the side files a task keeps) of an opened source.

    An adapter's own config stays out: its task materializes as the merged model, and
    an ``adapter_config.json`` next to full weights would make loaders take the directory
    for an adapter again.
    """
    if not is_adapter(reader):
        return "checkpoint", dict(reader.side_files)
    return "peft-lora", {n: p for n, p in reader.side_files.items() if n != ADAPTER_CONFIG}

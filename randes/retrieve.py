"""Getting one task back out of a superposition, streaming tensor by tensor.

    theta_t = theta_base + lambda * T_t^-1(S)

Each output tensor reads one base tensor and one superposition slot (or a private
tensor), so retrieval is one pass over base + superposition. Every output's name,
dtype and shape follow from the headers, so materialize plans its shards up front and
streams each tensor to disk as it is computed: about two of the largest tensors are in
memory at once, whatever the model size. Names are mapped back to
the fine-tune's own (``bert.`` prefix restored) so the result loads where the fine-tune
did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from randes.atomic import replacing, write_atomic
from randes.config import TransformConfig
from randes.errors import IncompatibleCheckpointError, RandesError
from randes.header import DTYPES
from randes.layout import check_superposition, layout_of
from randes.manifest import KeyMap
from randes.source import TensorMeta, TensorSource
from randes.transforms import TaskTransform
from randes.writer import ShardWriter, TensorSpec, WrittenShard

DEFAULT_SCALE_KEY = "*"
"""In a per-tensor scale dict, the lambda of tensors not named in it."""


def _scale_for(scale: float | Mapping[str, float], name: str) -> float:
    if not isinstance(scale, Mapping):
        return float(scale)
    if name in scale:
        return float(scale[name])
    if DEFAULT_SCALE_KEY in scale:
        return float(scale[DEFAULT_SCALE_KEY])
    raise ValueError(f"no scale for tensor {name!r} and no {DEFAULT_SCALE_KEY!r} default")


class _Retrieval:
    """One task's output tensors: all planned from the headers, each computed on demand."""

    def __init__(
        self,
        *,
        base: TensorSource,
        superposition: TensorSource | None,
        private: TensorSource | None,
        seed: int,
        key_map: KeyMap,
        config: TransformConfig,
        scale: float | Mapping[str, float],
    ) -> None:
        layout = layout_of(base, config)
        if superposition is not None:
            check_superposition(base, superposition, layout)
        self.base = base
        self.superposition = superposition
        self.private = private
        self.scale = scale
        self.layout = layout
        self.transform = TaskTransform(layout, seed)
        private_names = set(private.keys()) if private is not None else set()
        absent = frozenset(key_map.absent)
        # checkpoint name -> (base name, or None for a private tensor; its meta)
        self.plan: dict[str, tuple[str | None, TensorMeta]] = {}
        for name in base.keys():  # noqa: SIM118 (a TensorSource need not be iterable)
            if name in absent:  # the fine-tune did not have it: neither does its copy
                continue
            ck_name = key_map.to_checkpoint(name)
            if private is not None and ck_name in private_names:
                self.plan[ck_name] = (None, private.meta(ck_name))
            elif name in layout.private_base:
                raise IncompatibleCheckpointError(
                    f"private tensor {ck_name!r} of this task is missing (rank1 policy 'private')"
                )
            else:
                meta = base.meta(name)
                own = key_map.dtype_name(name) if meta.is_float else None
                if own is not None:  # the fine-tune's dtype (bf16 over an fp32 base...)
                    if own not in DTYPES:
                        raise IncompatibleCheckpointError(f"unknown task dtype {own!r}")
                    meta = TensorMeta(dtype=DTYPES[own], shape=meta.shape)
                self.plan[ck_name] = (name, meta)
        for ck_name in sorted(private_names - set(self.plan)):
            self.plan[ck_name] = (None, private.meta(ck_name))  # type: ignore[union-attr]

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec.of(ck_name, meta) for ck_name, (_, meta) in self.plan.items()]

    def tensor(self, ck_name: str) -> torch.Tensor:
        """Compute one output tensor: reads one base tensor and one slot (or a private one)."""
        name, meta = self.plan[ck_name]
        if name is None:
            assert self.private is not None
            return self.private.get(ck_name)  # verbatim
        theta = self.base.get(name)
        if name in self.layout.non_float or self.superposition is None:
            return theta.to(meta.dtype)
        slot = self.transform.slot_of(name)
        delta = self.transform.unscramble_one(
            name, self.superposition.get(slot).to(torch.float32), inplace=True
        )
        value = theta.to(torch.float32).add_(delta, alpha=_scale_for(self.scale, name))
        del delta
        return value.to(meta.dtype)


TaskRetrieval = _Retrieval
"""The per-task plan that `retrieve` and `materialize` run, under a public name: in-memory
servers (storage.runtime) check its `specs` before touching a module and compute single
tensors with `tensor`, so what they serve is what materialize writes, bit for bit."""


def retrieve(
    *,
    base: TensorSource,
    superposition: TensorSource | None,
    private: TensorSource | None,
    seed: int,
    key_map: KeyMap,
    config: TransformConfig,
    scale: float | Mapping[str, float],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (checkpoint name, tensor) of one task, in the fine-tune's dtypes.

    ``superposition=None`` stands for an all-zero superposition (a bundle without
    tasks). ``scale`` is lambda, or a dict of lambdas per base tensor name with an
    optional ``"*"`` default. Private tensors come back verbatim. Order: the base's
    tensors (sorted base names) but those ``key_map.absent``, then private tensors the
    base lacks (sorted).
    """
    plan = _Retrieval(
        base=base,
        superposition=superposition,
        private=private,
        seed=seed,
        key_map=key_map,
        config=config,
        scale=scale,
    )
    for ck_name in plan.plan:
        yield ck_name, plan.tensor(ck_name)


def materialize(
    *,
    base: TensorSource,
    superposition: TensorSource | None,
    private: TensorSource | None,
    seed: int,
    key_map: KeyMap,
    config: TransformConfig,
    scale: float | Mapping[str, float],
    out_dir: Path,
    side_files: Mapping[str, Path] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
    weights_dir: str = "",
) -> list[WrittenShard]:
    """Write one task as a standalone Hugging Face style model directory.

    ``model.safetensors`` (or shards + ``model.safetensors.index.json``), in
    ``weights_dir`` when the source kept them in a subfolder (sentence-transformers'
    legacy ``0_Transformer/``), plus copies of the side files under their relative
    paths (config.json, tokenizer, chat template, ``1_Pooling/config.json``...): what
    the fine-tune's own loader reads. ``out_dir`` must be new or empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # stale shards or index files would mix with the new ones when loaded
        raise RandesError(f"{out_dir}: destination exists and is not an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _Retrieval(
        base=base,
        superposition=superposition,
        private=private,
        seed=seed,
        key_map=key_map,
        config=config,
        scale=scale,
    )
    weights = out_dir.joinpath(*_relative_parts(weights_dir)) if weights_dir else out_dir
    with ShardWriter(weights, max_shard_bytes=max_shard_bytes, plan=plan.specs()) as writer:
        total = len(writer.order)
        for done, ck_name in enumerate(writer.order, start=1):
            writer.add(ck_name, plan.tensor(ck_name))
            if progress is not None:
                progress(done, total)
        shards = writer.finish(hf_index=True)
    for fname, src in sorted((side_files or {}).items()):
        dst = out_dir.joinpath(*_relative_parts(fname))
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(Path(src), dst)
    return shards


def _relative_parts(name: str) -> list[str]:
    """The components of a '/'-separated relative path, none of them empty, '.' or '..'."""
    parts = name.split("/")
    if not all(parts) or any(p in (".", "..") or "\\" in p for p in parts):
        raise ValueError(f"side file name {name!r} must be a relative path of plain names")
    return parts


def _copy_atomic(src: Path, dst: Path) -> None:
    if src.stat().st_size <= 64 * 1024 * 1024:
        write_atomic(dst, src.read_bytes())
    else:  # pragma: no cover - side files are small
        with replacing(dst) as tmp:
            shutil.copyfile(src, tmp)

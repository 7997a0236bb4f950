"""Writing one task out of a superposition as a standalone model directory: the
retrieval plan (randes.retrieve) streamed tensor by tensor into shards, plus the
fine-tune's side files, so the result loads where the fine-tune did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from randes.atomic import replacing, write_atomic
from randes.config import TransformConfig
from randes.errors import RandesError
from randes.manifest import KeyMap
from randes.retrieve import TaskRetrieval
from randes.source import TensorSource
from randes.writer import ShardWriter, WrittenShard


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
    plan = TaskRetrieval(
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
        for done, (ck_name, value) in enumerate(plan.tensors(writer.order), start=1):
            writer.add(ck_name, value)
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

"""Getting one task back out of a superposition, streaming tensor by tensor.

    theta_t = theta_base + lambda * T_t^-1(S)

Each base tensor reads one base tensor and one superposition slot (or a private
tensor), so retrieval is one pass over base + superposition. Names are mapped back to
the fine-tune's own (``bert.`` prefix restored) so the result loads where the fine-tune
did.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.errors import IncompatibleCheckpointError, RandesError
from randes.fold import check_superposition, layout_of
from randes.manifest import KeyMap
from randes.transforms import TaskTransform
from randes.writer import ShardWriter, WrittenShard, write_atomic

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


def retrieve(
    *,
    base: CheckpointReader,
    superposition: CheckpointReader | None,
    private: CheckpointReader | None,
    seed: int,
    key_map: KeyMap,
    config: TransformConfig,
    scale: float | Mapping[str, float],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (checkpoint name, tensor) of one task, in the base's dtypes.

    ``superposition=None`` stands for an all-zero superposition (a bundle without
    tasks). ``scale`` is lambda, or a dict of lambdas per base tensor name with an
    optional ``"*"`` default. Private tensors come back verbatim.
    """
    layout = layout_of(base, config)
    if superposition is not None:
        check_superposition(base, superposition, layout)
    transform = TaskTransform(layout, seed)
    private_names = set(private.keys()) if private is not None else set()
    emitted: set[str] = set()

    for name in base:
        ck_name = key_map.to_checkpoint(name)
        if private is not None and ck_name in private_names:
            yield ck_name, private.get(ck_name)
        elif name in layout.private_base:
            raise IncompatibleCheckpointError(
                f"private tensor {ck_name!r} of this task is missing (rank1 policy 'private')"
            )
        elif name in layout.non_float:
            yield ck_name, base.get(name)
        else:
            theta = base.get(name)
            if superposition is not None:
                slot = transform.slot_of(name)
                delta = transform.unscramble_one(name, superposition.get(slot).to(torch.float32))
                value = theta.to(torch.float32).add_(delta, alpha=_scale_for(scale, name))
                theta = value.to(theta.dtype)
            yield ck_name, theta
        emitted.add(ck_name)

    for ck_name in sorted(private_names - emitted):
        yield ck_name, private.get(ck_name)  # type: ignore[union-attr]


def materialize(
    *,
    base: CheckpointReader,
    superposition: CheckpointReader | None,
    private: CheckpointReader | None,
    seed: int,
    key_map: KeyMap,
    config: TransformConfig,
    scale: float | Mapping[str, float],
    out_dir: Path,
    side_files: Mapping[str, Path] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    progress: Callable[[int, int], None] | None = None,
) -> list[WrittenShard]:
    """Write one task as a standalone Hugging Face style model directory.

    ``model.safetensors`` (or shards + ``model.safetensors.index.json``) plus copies of
    the side files (config.json...). Loadable with ``safetensors.torch.load_file``.
    ``out_dir`` must be new or empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # stale shards or index files would mix with the new ones when loaded
        raise RandesError(f"{out_dir}: destination exists and is not an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_count = len(private.keys()) if private is not None else 0
    extra = private_count - sum(
        1 for n in base if private is not None and key_map.to_checkpoint(n) in private
    )
    total = len(base.keys()) + extra
    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes, prefix="model")
    with writer:
        for done, (name, tensor) in enumerate(
            retrieve(
                base=base,
                superposition=superposition,
                private=private,
                seed=seed,
                key_map=key_map,
                config=config,
                scale=scale,
            ),
            start=1,
        ):
            writer.add(name, tensor)
            if progress is not None:
                progress(done, total)
        shards = writer.finish(hf_index=True)
    for fname, src in sorted((side_files or {}).items()):
        if Path(fname).name != fname or fname in (".", ".."):
            raise ValueError(f"side file name {fname!r} must be a plain file name")
        _copy_atomic(Path(src), out_dir / fname)
    return shards


def _copy_atomic(src: Path, dst: Path) -> None:
    if src.stat().st_size <= 64 * 1024 * 1024:
        write_atomic(dst, src.read_bytes())
    else:  # pragma: no cover - side files are small
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)

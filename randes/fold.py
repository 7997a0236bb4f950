"""Folding one task into (or out of) a superposition, streaming tensor by tensor.

    S_new[slot] = S_parent[slot] + direction * T_t(theta_t - theta_base)[slot]

Every output tensor's name, dtype and shape follow from the headers, so both outputs
are planned before any data is read and the ShardWriter streams them to disk. Each
slot is computed from exactly one base tensor, one checkpoint tensor and one parent
slot, written and dropped: peak memory is about two of the largest tensors, and the
cost is one pass over base + checkpoint + parent (plus one extra read of the small
non-float buffers, compared with the base's to plan the private shards), whatever
the model size or the number of tasks already in the parent. The checkpoint is
reconciled with the base (randes.keymap: wrappers, prefix, absent tensors, dtypes)
from the headers before any data is read; a PEFT adapter is read as the merged model
it stands for (randes.adapters). Every checkpoint tensor is checked for NaN/Inf
before a result is returned, and an error deletes what was written. A base tensor
the fine-tune lacks adds nothing to its slot; deltas are computed in float32
whatever the two dtypes.

Private tensors (stored verbatim for this task only) are kept under the checkpoint's
names, training wrappers stripped: extra tensors the base lacks (task heads) or has
in another shape, non-float buffers that differ from the base, and, with rank1 policy
"private", the fine-tuned rank-1 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from randes.adapters import as_dense
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.errors import NonFiniteTensorError
from randes.keymap import Reconciled, read_config, reconcile
from randes.layout import Layout, check_superposition, layout_of, superposition_dtype
from randes.manifest import KeyMap
from randes.serving import SERVING_DIR, ServingWriter
from randes.source import TensorSource, metas_of
from randes.transforms import TaskTransform
from randes.writer import ShardWriter, TensorSpec, WrittenShard

Progress = Callable[[int, int], None]

SUPERPOSITION_DIR = "superposition"
PRIVATE_DIR = "private"


@dataclass
class FoldResult:
    superposition: list[WrittenShard]
    private: list[WrittenShard]
    key_map: KeyMap
    delta_norms: dict[str, float]
    serving: list[WrittenShard] = field(default_factory=list)
    """The quantized copy of ``superposition`` (config.serving); [] when it is None."""


_NORM_BLOCK = 4096


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.dtype.is_floating_point:
        return
    if tensor.element_size() == 1:  # float8: torch has no isfinite for it
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteTensorError(f"checkpoint tensor {name!r} holds NaN or Inf")


def l2_norm(x: torch.Tensor) -> float:
    """L2 norm of a float32 tensor, accurate to ~1e-9 relative, NaN/Inf when x has any.

    Blocks of 4096 are normed in float32 (short sums: accurate), their squares summed in
    float64. 10x cheaper than a float64 norm of the whole tensor, and it doubles as the
    finiteness check of a delta (NaN and Inf propagate), which torch.isfinite would
    otherwise cost again.
    """
    flat = x.reshape(-1)
    whole = flat.numel() - flat.numel() % _NORM_BLOCK
    total = 0.0
    if whole:
        blocks = torch.linalg.vector_norm(flat[:whole].view(-1, _NORM_BLOCK), dim=1)
        total += float(blocks.double().square().sum())
    if whole < flat.numel():
        total += float(torch.linalg.vector_norm(flat[whole:], dtype=torch.float64)) ** 2
    if not math.isfinite(total):  # non-finite values, or a float32 block overflowed
        if not bool(torch.isfinite(flat).all()):
            return math.nan
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    return math.sqrt(total)


def _delta(name: str, tuned: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(tuned - base) in float32 and its norm; NonFiniteTensorError on NaN/Inf."""
    delta = tuned.to(torch.float32) - theta.to(torch.float32)
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        check_finite(name, tuned)  # names the checkpoint when it is the culprit
        raise NonFiniteTensorError(f"delta of {name!r} is not finite (NaN/Inf in the base?)")
    return delta, norm


def owned_delta(
    checkpoint: TensorSource,
    ck_name: str,
    theta: torch.Tensor,
    tuned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """_delta of a checkpoint tensor, computed in the memory of the tensor read
    (``tuned``: that tensor, read already; the caller gives it up).

    Holds two tensors (the fine-tuned one, turned into the delta, and the base's), not
    three; the caller owns the result.
    """
    if tuned is None:
        tuned = checkpoint.get(ck_name)
    delta = tuned.to(torch.float32).sub_(theta.to(torch.float32))
    del tuned
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        del delta
        check_finite(ck_name, checkpoint.get(ck_name))  # names the checkpoint if the culprit
        raise NonFiniteTensorError(f"delta of {ck_name!r} is not finite (NaN/Inf in the base?)")
    return delta, norm


def check_compatible(base: TensorSource, checkpoint: CheckpointReader) -> Reconciled:
    """Reconcile ``checkpoint`` (a fine-tune or a PEFT adapter) with ``base`` from the
    headers alone (randes.keymap's decision table); IncompatibleCheckpointError when
    ``base`` cannot be its base."""
    return reconcile(
        metas_of(base),
        as_dense(checkpoint, base),
        config=read_config(checkpoint.side_files.get("config.json")),
    )


def all_finite(x: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN/Inf, in one read-only pass.

    ``torch.isfinite(x).all()`` writes a bool per value into a fresh tensor first (page
    faults included); ``aminmax`` is one reduction, and NaN and Inf reach its min or max.
    """
    if x.numel() == 0:
        return True
    if x.element_size() == 1:  # float8: no aminmax for it
        return bool(torch.isfinite(x.to(torch.float32)).all())
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_written(slot: str, stored: torch.Tensor) -> None:
    """What a fold writes must be finite: finite inputs can still overflow the bundle
    dtype (1e5 in float16, 2e38 + 2e38 in float32), and a non-finite slot would break
    every task of the bundle, the innocent ones included. Refuse the checkpoint."""
    if not all_finite(stored):
        raise NonFiniteTensorError(
            f"folding this checkpoint would make superposition slot {slot!r} overflow "
            f"{str(stored.dtype).removeprefix('torch.')} (Inf/NaN); checkpoint refused, "
            "the bundle is unchanged"
        )


def open_writers(
    base: TensorSource, layout: Layout, config: TransformConfig, out_dir: Path
) -> tuple[ShardWriter, ServingWriter | None]:
    """The writers of a new superposition: the master (``out_dir/superposition``, in
    the bundle dtype) and, when ``config.serving`` is set, its quantized copy
    (``out_dir/serving``), to be fed the same slots in the master writer's order."""
    sup_writer = ShardWriter(
        out_dir / SUPERPOSITION_DIR,
        max_shard_bytes=config.max_shard_bytes,
        plan=[
            TensorSpec(slot, superposition_dtype(config), base.meta(slot).shape)
            for slot in layout.superposed
        ],
    )
    if config.serving is None:
        return sup_writer, None
    serving_writer = ServingWriter(
        out_dir / SERVING_DIR,
        scheme=config.serving,
        slots=[(slot, tuple(base.meta(slot).shape)) for slot in sup_writer.order],
        max_shard_bytes=config.max_shard_bytes,
    )
    return sup_writer, serving_writer


def fold(
    *,
    base: TensorSource,
    checkpoint: CheckpointReader,
    parent: TensorSource | None,
    seed: int,
    config: TransformConfig,
    out_dir: Path,
    direction: int = 1,
    progress: Progress | None = None,
) -> FoldResult:
    """Add (direction=1) or subtract (-1) one task's scrambled delta to a superposition.

    Writes ``out_dir/superposition`` (the whole new superposition), when adding
    ``out_dir/private`` (this task's private tensors), and when ``config.serving`` is set
    ``out_dir/serving``: the new superposition quantized slot by slot as it is written,
    always from the fp32-computed master value (never from a parent's serving copy, so
    no quantization error accumulates across versions).
    """
    if direction not in (1, -1):
        raise ValueError("direction must be 1 or -1")
    out_dir = Path(out_dir)
    layout = layout_of(base, config)
    rec = check_compatible(base, checkpoint)
    if parent is not None:
        check_superposition(base, parent, layout)
    tuned = rec.source  # the checkpoint under unwrapped names (the key map's)
    key_map, absent = rec.key_map, rec.absent
    transform = TaskTransform(layout, seed)
    dtype = superposition_dtype(config)

    buffers = [n for n in rec.buffers if n in layout.non_float]
    private_base = sorted(n for n in layout.private_base if n not in absent)
    total = len(layout.superposed) + len(private_base) + len(buffers) + len(rec.extras)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # Private outputs, checkpoint name -> base source (None: an extra the base lacks).
    # Non-float buffers are kept only when they differ from the base: that is decided
    # here, one buffer at a time, so the private shards can be planned before writing.
    private_of: dict[str, str | None] = {}
    for source in private_base:
        private_of[key_map.to_checkpoint(source)] = source
    for source in buffers:
        ck_name = key_map.to_checkpoint(source)
        if direction == 1 and not torch.equal(tuned.get(ck_name), base.get(source)):
            private_of[ck_name] = source
        tick()
    private_of.update(dict.fromkeys(rec.extras))

    delta_norms: dict[str, float] = {}
    sup_writer, serving_writer = open_writers(base, layout, config, out_dir)
    priv_writer = (
        ShardWriter(
            out_dir / PRIVATE_DIR,
            max_shard_bytes=config.max_shard_bytes,
            plan=[TensorSpec.of(n, tuned.meta(n)) for n in private_of],
        )
        if direction == 1
        else None
    )

    # No read-ahead here (randes.fold_batch has one): a tensor read on another thread
    # comes from that thread's malloc arena, and the peak then varies by one tensor
    # from run to run; the checkpoint is hashed as it is read either way.
    try:
        for slot in sup_writer.order:
            source = transform.source_of(slot)
            if source in absent:  # no delta: this task leaves the slot as it was
                value = torch.zeros(base.meta(slot).shape, dtype=torch.float32)
            else:
                ck_name = key_map.to_checkpoint(source)
                value, delta_norms[source] = owned_delta(tuned, ck_name, base.get(source))
                value = transform.scramble_one(source, value, inplace=True)
            if direction == -1:
                value = value.neg_()
            if parent is not None:
                value = value.add_(parent.get(slot).to(torch.float32))
            stored = value.to(dtype)
            del value
            check_written(slot, stored)
            sup_writer.add(slot, stored)
            if serving_writer is not None:
                serving_writer.add(slot, stored)
            del stored
            tick()

        # unfold writes no private tensors, but still checks them and records their norms
        for ck_name in priv_writer.order if priv_writer is not None else list(private_of):
            base_name = private_of[ck_name]
            value = tuned.get(ck_name)
            if base_name is None:
                check_finite(ck_name, value)
            elif base_name in layout.private_base:
                _, delta_norms[base_name] = _delta(ck_name, value, base.get(base_name))
            if priv_writer is not None:
                priv_writer.add(ck_name, value)
            del value
            if base_name not in layout.non_float:  # those were counted when compared
                tick()

        superposition = sup_writer.finish()
        serving = serving_writer.finish() if serving_writer is not None else []
        private = priv_writer.finish() if priv_writer is not None else []
    except BaseException:
        sup_writer.abort()
        if serving_writer is not None:
            serving_writer.abort()
        if priv_writer is not None:
            priv_writer.abort()
        raise
    return FoldResult(
        superposition=superposition,
        private=private,
        key_map=key_map,
        delta_norms=delta_norms,
        serving=serving,
    )


def unfold(
    *,
    base: TensorSource,
    checkpoint: CheckpointReader,
    parent: TensorSource,
    seed: int,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None = None,
) -> FoldResult:
    """Remove a task: the exact inverse of fold (same checkpoint, same seed), no private output."""
    return fold(
        base=base,
        checkpoint=checkpoint,
        parent=parent,
        seed=seed,
        config=config,
        out_dir=out_dir,
        direction=-1,
        progress=progress,
    )

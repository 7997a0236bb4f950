"""Capacity planning: when is a bundle full, decided from stored norms alone.

Every task of a bundle hears the others as noise of relative energy
r_t = sum_{s != t} ||delta_s||^2 / ||theta_base||^2 (randes.scaling); the data-free
lambda shrinks against it, and past a point no lambda saves the weakest task. Adding a
task raises r for everyone already in the bundle, so a bundle is full when one more
task would push any member's r past a limit. A new task then goes to another bundle of
the same base (a bundle group) instead of degrading everyone: storage grows by one
superposition (an int4 serving copy is ~1/7 of the base), quality does not drop.

Small fine-tunes (~1% deltas) have r ~ 1e-4 per task: hundreds fit in one bundle.
Large ones (~8% deltas) fill a bundle within a handful of tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from randes.checkpoint import CheckpointReader
from randes.config import DEFAULT_MAP, MapName, TransformConfig
from randes.fold import check_compatible, owned_delta
from randes.layout import layout_of
from randes.scaling import Norms, relative_interference
from randes.source import TensorSource

MAX_INTERFERENCE: dict[MapName, float] = {
    "columns": 0.03,
    "two-sided": 0.02,
    "elementwise": 0.02,
}
"""Default limit on any member's relative interference r_t, per sign map: the largest
limit whose group keeps >= 98% mean normalized validation accuracy on digits-13, checked
on digits-8 and the large-delta suite. ``columns``: calibrated with rank1="private" (the
default then; docs/benchmarks.md, "Quality against storage"). ``elementwise``:
calibrated with the current default config (rank1="flip": rank-1 tensors are superposed
and counted in r_t, so the same accuracy sits at a lower r_t; "Quality by map").
``two-sided`` was not calibrated on its own: it takes the elementwise limit (at equal r_t
it measured at or slightly below elementwise, never above)."""

DEFAULT_MAX_INTERFERENCE = MAX_INTERFERENCE[DEFAULT_MAP]
"""The limit of a bundle group of the default map."""


def default_limit(kind: MapName) -> float:
    """The capacity limit of a group whose bundles use sign map ``kind``."""
    return MAX_INTERFERENCE[kind]


def interference(
    delta_norms: Mapping[str, Norms], base_norms: Norms, names: Sequence[str]
) -> dict[str, float]:
    """r_t of every task of a bundle holding ``delta_norms``' tasks."""
    return {
        task: relative_interference(task, delta_norms, base_norms, names) for task in delta_norms
    }


def fits(
    members: Mapping[str, Norms],
    task: str,
    norms: Norms,
    base_norms: Norms,
    names: Sequence[str],
    *,
    limit: float = DEFAULT_MAX_INTERFERENCE,
) -> bool:
    """Whether ``task`` can join ``members`` with every r_t (its own included) <= limit.

    An empty bundle always fits: a task alone has no interference.
    """
    if not members:
        return True
    together = {**members, task: norms}
    return max(interference(together, base_norms, names).values()) <= limit


def place(
    bundles: Sequence[Mapping[str, Norms]],
    task: str,
    norms: Norms,
    base_norms: Norms,
    names: Sequence[str],
    *,
    limit: float = DEFAULT_MAX_INTERFERENCE,
) -> int | None:
    """Index of the first bundle ``task`` fits in, or None when a new bundle is needed."""
    for index, members in enumerate(bundles):
        if fits(members, task, norms, base_norms, names, limit=limit):
            return index
    return None


def measure_delta_norms(
    base: TensorSource, checkpoint: CheckpointReader, config: TransformConfig
) -> dict[str, float]:
    """Per-tensor delta norms of the superposed tensors: one streaming pass, no writes.

    The same numbers a fold records in the manifest, available before choosing where
    to fold.
    """
    layout = layout_of(base, config)
    rec = check_compatible(base, checkpoint)
    out: dict[str, float] = {}
    for name in layout.superposed:
        if name in rec.absent:
            continue
        ck_name = rec.key_map.to_checkpoint(name)
        delta, out[name] = owned_delta(rec.source, ck_name, base.get(name))
        del delta
    return out

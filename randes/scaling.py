"""The retrieval scale lambda: theta_t = theta_base + lambda * T_t^-1(S).

Override order: the task's own scale > the bundle's config.scale > the data-free
default below, computed only from norms every manifest already stores (each task's
per-tensor delta norms, the base's per-tensor norms). No data, no evaluator.

Why this form. What task t gets back is its own delta plus the scrambled deltas of the
others, which act as zero-mean noise of energy N_t = sum_{s != t} ||delta_s||^2.
Shrinking by lambda trades the task's own signal, (1 - lambda)^2 of it lost, against
that noise, lambda^2 of it kept. A network shrugs off random noise that is small next
to its weights (fine-tunes of ~1% barely disturb each other whatever their number, and
lambda 1 is best); noise comparable to the weights breaks it (deltas of ~15%: lambda
about 0.6 is best on our large-delta digits suite). So the shrinkage is driven by the
noise energy RELATIVE TO THE BASE, r_t = N_t / ||theta_base||^2 over the superposed tensors:

    lambda_t = 1 / (1 + NOISE_GAIN * r_t)

NOISE_GAIN is the one constant per sign map (NOISE_GAINS). The column map's was fitted
on validation accuracy pooled over the digits suites (8 and 13 tasks of 3-8% deltas,
8 tasks of ~16% deltas) and checked on test, and on the MiniLM suite (~1% deltas, where
every gain gives lambda ~1): lambda lands within 2 points of the best fixed lambda on
each (docs/benchmarks.md, "Quality against storage"). Per-tensor lambdas (same law, each
tensor's own r) were measured and do not pay: 2-5 points worse on digits, level on
MiniLM, so the task-level lambda is the default. The same r_t is what randes.capacity
uses to decide when a bundle is full.

Per map. Column flips keep a delta's row structure, so the others' cross-talk lands in
the output directions a task's own delta uses (coherent noise); the two-sided and
elementwise maps make it incoherent, which costs far less accuracy at the same r_t. The
gain of each map was refitted on its own (same procedure, validation only;
docs/benchmarks.md, "Quality by map"): with rank-1 tensors superposed (rank1="flip", the
default) the new maps' validation curves peak at the same 1.5 as the column map's, so
the law is the same, the noise it shrinks against is simply less harmful. The gain of a
bundle is NOISE_GAINS[config.map]; bundles written before maps existed are column flips
and keep NOISE_GAIN, so their lambdas do not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from randes.config import MapName, TransformConfig
from randes.layout import layout_of
from randes.manifest import BundleManifest, TaskEntry
from randes.source import TensorSource

DEFAULT_SCALE = 1.0
"""lambda for a task alone in its bundle (nothing to shrink against): exact retrieval."""

NOISE_GAIN = 1.5
"""How strongly base-relative cross-talk energy pulls lambda below 1 under column flips
(see module doc)."""

NOISE_GAINS: dict[MapName, float] = {
    "columns": NOISE_GAIN,
    "two-sided": 1.5,
    "elementwise": 1.5,
}
"""The gain of each sign map, each fitted on validation accuracy pooled over the suites
of benchmarks.quality_maps (digits 8 and 13, large-delta digits; MiniLM's ~1% deltas give
lambda 1.000 at every gain). Measured with rank1="flip" (rank-1 tensors superposed, so
they add cross-talk too): the new maps' curves peak at 1.5 like the column map's, though
every map is better at its data-free lambda than columns (docs/benchmarks.md, "Quality by
map")."""


def noise_gain(kind: MapName) -> float:
    """The data-free law's gain for bundles of sign map ``kind``."""
    return NOISE_GAINS[kind]


Norms = Mapping[str, float]


def relative_interference(
    own: str, delta_norms: Mapping[str, Norms], base_norms: Norms, names: Sequence[str]
) -> float:
    """r_t: cross-talk energy task ``own`` sees, relative to the base's energy.

    ``delta_norms`` maps every task of the bundle to its per-tensor delta norms;
    ``names`` are the superposed tensors (private tensors carry no cross-talk).
    """
    base_energy = sum(base_norms.get(n, 0.0) ** 2 for n in names)
    if base_energy <= 0.0:
        return 0.0
    noise = sum(
        norms.get(n, 0.0) ** 2 for task, norms in delta_norms.items() if task != own for n in names
    )
    return noise / base_energy


def tensor_interference(
    own: str, delta_norms: Mapping[str, Norms], base_norms: Norms, names: Sequence[str]
) -> dict[str, float]:
    """r_t per tensor: the cross-talk energy of each superposed tensor over the base's."""
    out: dict[str, float] = {}
    for name in names:
        base_energy = base_norms.get(name, 0.0) ** 2
        noise = sum(norms.get(name, 0.0) ** 2 for task, norms in delta_norms.items() if task != own)
        out[name] = noise / base_energy if base_energy > 0.0 else 0.0
    return out


def shrinkage(interference: float, gain: float = NOISE_GAIN) -> float:
    """lambda for a relative interference r: 1 / (1 + gain * r)."""
    if interference < 0:
        raise ValueError("interference must be >= 0")
    return 1.0 / (1.0 + gain * interference)


def data_free_scale(
    own: str,
    delta_norms: Mapping[str, Norms],
    base_norms: Norms,
    names: Sequence[str],
    *,
    gain: float = NOISE_GAIN,
) -> float:
    """The data-free lambda of task ``own`` in a bundle holding ``delta_norms``' tasks."""
    return shrinkage(relative_interference(own, delta_norms, base_norms, names), gain)


def data_free_tensor_scales(
    own: str,
    delta_norms: Mapping[str, Norms],
    base_norms: Norms,
    names: Sequence[str],
    *,
    gain: float = NOISE_GAIN,
) -> dict[str, float]:
    """Per-tensor data-free lambdas (same law, each tensor's own interference)."""
    return {
        name: shrinkage(r, gain)
        for name, r in tensor_interference(own, delta_norms, base_norms, names).items()
    }


def resolve_scale(config: TransformConfig, task_scale: float | None, data_free: float) -> float:
    """lambda to use: the task's scale, else the bundle's, else the data-free one."""
    if task_scale is not None:
        if not task_scale > 0:
            raise ValueError(f"scale must be > 0, got {task_scale}")
        return float(task_scale)
    if config.scale is not None:
        return float(config.scale)
    return float(data_free)


def manifest_task_scale(
    manifest: BundleManifest, entry: TaskEntry, base: TensorSource, base_norms: Norms
) -> float:
    """lambda of one task of a version: its own scale, the bundle's, else data-free.

    Everything comes from the manifests (delta norms, base norms) and the base's headers
    (which tensors are superposed), so a pulled directory with no registry gets the same
    lambda as the workspace."""
    names = layout_of(base, manifest.transform).superposed
    return task_scale_over(manifest, entry, names, base_norms)


def task_scale_over(
    manifest: BundleManifest, entry: TaskEntry, names: Sequence[str], base_norms: Norms
) -> float:
    """`manifest_task_scale` over known superposed tensor ``names`` (no base needed:
    registry queries take them from the superposition shards' tensor lists)."""
    free = data_free_scale(
        entry.name,
        {t.name: t.delta_norms for t in manifest.tasks},
        base_norms,
        names,
        gain=noise_gain(manifest.transform.map),
    )
    return resolve_scale(manifest.transform, entry.scale, free)

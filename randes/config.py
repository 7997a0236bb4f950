"""Per-bundle transform settings, fixed when the bundle is created."""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from randes.quantize import QuantScheme

Rank1Policy = Literal["flip", "plain", "private"]
"""What happens to rank-1 tensors (biases, norms):

- ``flip``: element-wise random sign flip, superposed like everything else;
- ``plain``: superposed without any map (task-arithmetic style, interference unscrambled);
- ``private``: kept out of the superposition, stored verbatim per task (costs their size).
"""

SuperpositionDType = Literal["float32", "bfloat16", "float16"]

MapName = Literal["columns", "two-sided", "elementwise"]
"""The sign map of each task (randes.transforms), drawn from (task seed, tensor name):

- ``columns``: one sign per column, W -> W D_c (the paper's);
- ``two-sided``: one sign per row and per column, W -> D_r W D_c;
- ``elementwise``: an independent sign per entry.

All three are their own inverse and cost nothing to store (a seed per task)."""

MAPS: tuple[MapName, ...] = ("columns", "two-sided", "elementwise")

DEFAULT_MAP: MapName = "elementwise"
"""The map of a new bundle. Chosen by measurement (docs/benchmarks.md, "Quality by map"):
column flips keep a delta's row structure, so under them a task hears the others'
cross-talk in the very output directions its own (near low-rank) delta uses; scrambling
every entry makes that cross-talk incoherent noise, which a network shrugs off far
better on large deltas, and costs the same on ~1% deltas."""

LEGACY_MAP: MapName = "columns"
"""The map of every bundle written before the setting existed (they all used column flips)."""


def with_stored_map(transform: Mapping[str, Any]) -> dict[str, Any]:
    """A persisted transform config (manifest or registry row) with its map made explicit.

    Configs are always persisted whole (model_dump), so one without ``map`` was written
    before the setting existed: its superposition holds column flips, and reading it with
    today's default would scramble every task it holds.
    """
    out = dict(transform)
    out.setdefault("map", LEGACY_MAP)
    return out


DEFAULT_SERVING = QuantScheme(bits=4, group_size=64)
"""The serving format of a new bundle, the one place it is chosen: int4 with one float32
scale per 64 values is 4.5 bits per value, ~14% of the fp32 superposition."""


class TransformConfig(BaseModel):
    """How task deltas are scrambled and stored in one bundle.

    Every field is part of the bundle's identity: changing it would make the stored
    superposition unreadable, so it is written into every manifest.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sign_flip: bool = True
    map: MapName = Field(
        default=DEFAULT_MAP,
        description="Which sign map sign_flip applies; persisted configs without it are "
        "'columns' (with_stored_map).",
    )
    layer_shuffle: bool = True
    rank1: Rank1Policy = Field(
        default="flip",
        description="flip: a new bundle's whole pulled size stays within 1.25x the fp32 "
        "base even on small models whose rank-1 tensors are a large share "
        "(docs/benchmarks.md, 'Quality by map').",
    )
    dtype: SuperpositionDType = "float32"
    scale: float | None = Field(
        default=None,
        gt=0,
        description="Bundle-wide lambda; None selects the data-free default (randes.scaling).",
    )
    max_shard_bytes: int = Field(default=512 * 1024 * 1024, ge=1024 * 1024)
    serving: QuantScheme | None = Field(
        default=DEFAULT_SERVING,
        description="Quantized copy of each version's superposition that pull/materialize "
        "serve (randes.quantize); None serves the master. Rows written before it existed "
        "get the default.",
    )


def stored_config(transform: Mapping[str, Any]) -> TransformConfig:
    """The TransformConfig of a persisted config (a registry row's JSON), legacy map
    included (with_stored_map). Manifests get the same through BundleManifest."""
    return TransformConfig.model_validate(with_stored_map(transform))

"""Per-bundle transform settings, fixed when the bundle is created."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from randes.quantize import QuantScheme

Rank1Policy = Literal["flip", "plain", "private"]
"""What happens to rank-1 tensors (biases, norms):

- ``flip``: element-wise random sign flip, superposed like everything else;
- ``plain``: superposed without any map (task-arithmetic style, interference unscrambled);
- ``private``: kept out of the superposition, stored verbatim per task (costs their size).
"""

SuperpositionDType = Literal["float32", "bfloat16", "float16"]

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
    layer_shuffle: bool = True
    rank1: Rank1Policy = "private"
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

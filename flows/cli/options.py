"""Option types, value checks and the transform options shared by the commands.

`bundle create` and `group create` take the same transform options; fold, materialize
and validate the same ``--scale``. Each is declared once here, with the check that
runs before any work starts (a NaN lambda would pass a plain ``> 0`` range check and
only fail deep inside a fold, after its objects were uploaded).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from randes.config import TransformConfig


class Rank1(StrEnum):
    flip = "flip"
    plain = "plain"
    private = "private"


class SignMap(StrEnum):
    columns = "columns"
    two_sided = "two-sided"
    elementwise = "elementwise"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Serving(StrEnum):
    int8 = "int8"
    int4 = "int4"
    int3 = "int3"
    none = "none"


def group_size(value: str | None) -> int | str | None:
    """``--group-size``: values per float32 scale, or ``row`` for one scale per row."""
    if value is None or value == "row":
        return value
    from pydantic import ValidationError

    from randes.quantize import QuantScheme

    try:
        size = int(value)
        QuantScheme(group_size=size)  # its bounds are the one definition of a valid size
    except (ValueError, ValidationError):
        raise typer.BadParameter(
            f"{value!r} is not 'row' or a whole number from 8 to {1 << 20}"
        ) from None
    return size


def positive_scale(value: float | None) -> float | None:
    """A lambda must be a finite number in (0, MAX_SCALE]: NaN would pass a plain ``> 0``
    range check and only fail deep inside a fold, after its objects were uploaded, and
    1e300 would overflow every retrieved weight."""
    from storage.workspace import MAX_SCALE

    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise typer.BadParameter(f"{value} is not a finite number > 0 and <= {MAX_SCALE:g}")
    return value


def finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


MasterFlag = Annotated[
    bool,
    typer.Option(
        "--master", help="Use the fp32 master superposition instead of the quantized serving copy."
    ),
]
PullMasterFlag = Annotated[
    bool, typer.Option("--master", help="Also download the fp32 master superposition(s).")
]

JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ScaleOption = Annotated[
    float | None, typer.Option(help="Override lambda.", callback=positive_scale)
]
GroupFlag = Annotated[
    bool,
    typer.Option(
        "--group",
        help="The first argument names a bundle group (see `randes group`), not a bundle.",
    ),
]

# Transform options shared by `bundle create` and `group create`.
SignFlipOption = Annotated[bool, typer.Option(help="Random sign flips (the map: --map).")]
MapOption = Annotated[
    SignMap | None,
    typer.Option(
        "--map",
        help="Sign map: a sign per column, per row and column, or per entry "
        "(default: randes.config.DEFAULT_MAP).",
    ),
]
LayerShuffleOption = Annotated[bool, typer.Option(help="Random layer shuffling.")]
Rank1Option = Annotated[
    Rank1 | None,
    typer.Option(help="Rank-1 tensors: flipped, superposed unmapped, or stored per task."),
]
DTypeOption = Annotated[DType, typer.Option(help="Storage dtype of the superposition.")]
GateOption = Annotated[
    float | None,
    typer.Option(help="Validation gate: minimum normalized score per task.", callback=finite),
]
ServingOption = Annotated[
    Serving | None,
    typer.Option(help="Format pull/materialize serve (default int4); none: the master."),
]
GroupSizeOption = Annotated[
    str | None,
    typer.Option(
        "--group-size",
        metavar="N|row",
        help="Values per quantization scale (default 64), or row: one per row.",
        callback=group_size,
    ),
]


def transform_config(
    *,
    sign_flip: bool,
    layer_shuffle: bool,
    rank1: Rank1 | None,
    dtype: DType,
    scale: float | None,
    serving: Serving | None,
    group_size: int | str | None,
    sign_map: SignMap | None = None,
) -> TransformConfig:
    """The TransformConfig of `bundle create` / `group create` options (one place)."""
    from randes.config import DEFAULT_SERVING, TransformConfig
    from randes.quantize import QuantScheme

    fields: dict[str, object] = {
        "sign_flip": sign_flip,
        "layer_shuffle": layer_shuffle,
        "dtype": dtype.value,
        "scale": scale,
    }
    if rank1 is not None:
        fields["rank1"] = rank1.value
    if sign_map is not None:
        fields["map"] = sign_map.value
    if serving is Serving.none:
        if group_size is not None:
            raise typer.BadParameter("--group-size needs a quantized --serving format")
        fields["serving"] = None
    elif serving is not None or group_size is not None:
        bits = int(serving.value.removeprefix("int")) if serving else DEFAULT_SERVING.bits
        size = DEFAULT_SERVING.group_size if group_size is None else group_size
        fields["serving"] = QuantScheme.model_validate(
            {"bits": bits, "group_size": None if size == "row" else size}
        )
    return TransformConfig.model_validate(fields)

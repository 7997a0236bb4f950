"""The row layout of a compiled task switch (randes.switch_program builds the rows,
randes.kernels_jit.run_program reads them): one range of one tensor, by addresses, as
an int64 row, so one compiled call covers every tensor of a task with no Python object
per tensor.
"""

from __future__ import annotations

# OUT: the output; N: entries; BASE, CODES, SCALES, EBITS (0: none), COLS and ROWS
# (side signs, 0: none): the inputs at the range's first entry; WIDTH: the side signs'
# row width; LO: the range's first entry in its tensor (side signs are indexed by it);
# GROUP, BITS, MODE, STEP: as dequant_add_ takes them; N_SCALES, N_ROWS: lengths;
# BASE_LOW, BASE_HIGH: the base's mapping (0: lent from memory, nothing dropped).
(
    OUT,
    N,
    BASE,
    CODES,
    SCALES,
    EBITS,
    COLS,
    ROWS,
    WIDTH,
    LO,
    GROUP,
    BITS,
    MODE,
    STEP,
    N_SCALES,
    N_ROWS,
    BASE_LOW,
    BASE_HIGH,
) = range(18)
DROPS, DROP_FIELDS = 18, 4
"""Then (address, bytes, low, high) of the codes, the scales and the sign stream: their
pages are dropped once the row is done (high = 0: nothing to drop)."""
ROW_FIELDS = DROPS + 3 * DROP_FIELDS

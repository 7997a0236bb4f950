"""Exception hierarchy of the core.

Every error the project raises on bad input derives from `RandesError`, so the
command line can print one clear line for all of them and exit non-zero, while
anything else (a real bug) still shows its traceback.
"""


class RandesError(Exception):
    """Base class of every error the project reports to users as one line."""


class InvalidNameError(RandesError, ValueError):
    """A bundle, base or task name that could escape a path or object key."""


class CheckpointError(RandesError):
    """A checkpoint that cannot be folded (missing, corrupt, mismatched...)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint (`.bin`, `.pt`, ...): loading it could run code."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file whose header or data is damaged or implausible."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint whose tensors do not match the base (shape, dtype, missing keys)."""


class SourceChangedError(CheckpointError):
    """A checkpoint whose bytes changed between being hashed and being read."""


class NonFiniteTensorError(CheckpointError):
    """A checkpoint tensor holding NaN or Inf."""


class ManifestError(RandesError):
    """A bundle manifest that does not parse or contradicts itself."""


class IntegrityError(RandesError):
    """Stored bytes whose sha256 differs from the one recorded for them."""

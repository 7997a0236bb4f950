"""Which tasks a validation of one bundle version measures: a cost that does not grow with N.

Measuring a task means retrieving it (base + superposition read, a full model rebuilt)
and scoring it, so validating every task of every version costs N retrievals per new
version. Most of that work repeats what the last validation already measured: a task's
own delta never changes once folded; what changes is the cross-talk the others add, and
the stored norms predict that (r_t, randes.scaling). So a version measures:

- new tasks, always: every task never validated (by its seed: a task folded out and in
  again is new);
- tasks whose last measurement failed the gate, always (a skip must never hide a
  failure);
- tasks whose predicted interference r_t moved by more than ``drift`` (relative) since
  they were last measured: a big fine-tune joining raises everyone's noise at once, and
  they all get measured;
- a rotating sample of the rest, oldest measurement first, at least
  ceil(rest / window) per version (or ``sample`` when set) and every task whose last
  measurement is ``window`` or more versions old. So in any validated version, every
  task was measured within its last ``window`` versions, whatever the cadence of
  validations.

Defaults: ``drift`` 0.25, ``window`` 8. One new task per version into a bundle of 32
costs 1 + ceil(31 / 8) = 5 retrievals. Adding one task of similar size to a bundle of n
raises each other task's r_t by 1 / (n - 1) of its value: at n = 32 the drift rule stays
quiet for the 7 versions a task may wait for its turn (7/31 = 23% < 25%), so steady
ingestion stays at that cost, and a task of outsized norms triggers the drift rule for
all it disturbs. The drift is relative so the cost is the same whatever the size of the
deltas: how much interference a bundle may carry at all is the capacity limit's job
(randes.capacity), not the validation's.

Pure functions over plain values: the flows read the manifest, the base norms and the
registry's last checks, and record the decisions this module returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from randes.errors import RandesError
from randes.manifest import BundleManifest
from randes.scaling import Norms, relative_interference

Reason = Literal["new", "failed", "interference", "rotation", "all", "skipped"]
REASONS: tuple[Reason, ...] = ("new", "failed", "interference", "rotation", "all", "skipped")

DEFAULT_DRIFT = 0.25
"""Relative move of a task's predicted interference that forces a re-measurement."""

DEFAULT_WINDOW = 8
"""Every task is measured at least once every this many versions."""


class PolicyError(RandesError, ValueError):
    """A validation policy out of range (negative drift, a window under one version...)."""


@dataclass(frozen=True)
class ValidationPolicy:
    """How much of a version a validation measures (module doc).

    ``sample`` None: ceil(existing tasks / window) tasks rotate per version, the least
    that keeps the window with one validation per version."""

    drift: float = DEFAULT_DRIFT
    window: int = DEFAULT_WINDOW
    sample: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.drift) and self.drift >= 0):
            raise PolicyError(f"drift must be a finite number >= 0, got {self.drift}")
        if self.window < 1:
            raise PolicyError(f"window must be >= 1 version, got {self.window}")
        if self.sample is not None and self.sample < 0:
            raise PolicyError(f"sample must be >= 0, got {self.sample}")

    def overridden(
        self, *, drift: float | None = None, window: int | None = None, sample: int | None = None
    ) -> ValidationPolicy:
        """This policy with the given fields replaced (None keeps a field)."""
        fields: dict[str, float | int] = {}
        if drift is not None:
            fields["drift"] = drift
        if window is not None:
            fields["window"] = window
        if sample is not None:
            fields["sample"] = sample
        return replace(self, **fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TaskState:
    """A task of the version being validated, with its predicted interference there."""

    name: str
    seed: int
    added_in_version: int
    interference: float


@dataclass(frozen=True)
class LastCheck:
    """A task's latest measurement at or before the version being validated."""

    version: int
    seed: int
    interference: float
    passed: bool


@dataclass(frozen=True)
class Decision:
    """Whether one task is measured, and why (or why not), in words for the reports."""

    task: str
    seed: int
    measured: bool
    reason: Reason
    detail: str
    interference: float
    last_version: int | None = None


def predicted_interference(manifest: BundleManifest, base_norms: Norms) -> dict[str, float]:
    """r_t of every task of a version, from the norms its manifest stores alone.

    Over the tensors its superposition shards hold (as `storage.queries` does): no base
    or shard is read."""
    names = sorted({t for shard in manifest.superposition for t in shard.tensors})
    norms = {t.name: t.delta_norms for t in manifest.tasks}
    return {t: relative_interference(t, norms, base_norms, names) for t in norms}


def task_states(manifest: BundleManifest, base_norms: Norms) -> list[TaskState]:
    """The tasks of a version in manifest order, with their predicted interference."""
    r = predicted_interference(manifest, base_norms)
    return [TaskState(t.name, t.seed, t.added_in_version, r[t.name]) for t in manifest.tasks]


def drift_of(now: float, then: float) -> float:
    """Relative move of r_t; from 0 (a task alone) any rise is infinite."""
    if then > 0:
        return abs(now - then) / then
    return math.inf if now > 0 else 0.0


def select(
    version: int,
    tasks: Sequence[TaskState],
    history: Mapping[str, LastCheck],
    policy: ValidationPolicy,
    *,
    everything: bool = False,
) -> list[Decision]:
    """One decision per task of ``version``, in the order of ``tasks``.

    ``history`` maps task names to their latest check at a version <= ``version``; a
    check of another seed (an earlier task of the same name) does not count.
    """
    if everything:
        return [
            Decision(t.name, t.seed, True, "all", "all requested", t.interference) for t in tasks
        ]
    chosen: dict[str, Decision] = {}
    rest: list[tuple[TaskState, LastCheck]] = []
    existing = 0
    for t in tasks:
        last = history.get(t.name)
        if last is None or last.seed != t.seed or last.version > version:
            chosen[t.name] = Decision(
                t.name,
                t.seed,
                True,
                "new",
                f"added in version {t.added_in_version}"
                + ("" if t.added_in_version == version else ", never validated"),
                t.interference,
            )
            continue
        existing += 1
        moved = drift_of(t.interference, last.interference)
        if not last.passed:
            chosen[t.name] = Decision(
                t.name,
                t.seed,
                True,
                "failed",
                f"failed the gate at version {last.version}",
                t.interference,
                last.version,
            )
        elif moved > policy.drift:
            chosen[t.name] = Decision(
                t.name,
                t.seed,
                True,
                "interference",
                f"interference moved by {_percent(moved)} since version {last.version} "
                f"(r_t {last.interference:.3g} -> {t.interference:.3g}, threshold "
                f"{_percent(policy.drift)})",
                t.interference,
                last.version,
            )
        else:
            rest.append((t, last))
    quota = policy.sample if policy.sample is not None else math.ceil(existing / policy.window)
    already = sum(d.reason in ("failed", "interference") for d in chosen.values())
    rest.sort(key=lambda pair: (pair[1].version, pair[0].name))  # oldest measurement first
    due = sum(version - last.version >= policy.window for _, last in rest)
    rotate = max(due, quota - already)
    for index, (t, last) in enumerate(rest):
        moved = drift_of(t.interference, last.interference)
        if index < rotate:
            due_now = version - last.version >= policy.window
            chosen[t.name] = Decision(
                t.name,
                t.seed,
                True,
                "rotation",
                f"last validated at version {last.version}"
                + (f" (due: window {policy.window})" if due_now else ""),
                t.interference,
                last.version,
            )
        else:
            chosen[t.name] = Decision(
                t.name,
                t.seed,
                False,
                "skipped",
                f"last validated at version {last.version}; interference moved by "
                f"{_percent(moved)} (threshold {_percent(policy.drift)})",
                t.interference,
                last.version,
            )
    return [chosen[t.name] for t in tasks]


def _percent(fraction: float) -> str:
    """A relative move in words; infinite when r_t rose from 0 (the task was alone)."""
    return "inf (from 0)" if math.isinf(fraction) else f"{100 * fraction:.1f}%"

"""Writes the conformance table from the measured results when asked.

    RANDES_CONFORMANCE_DOC=docs/conformance.md .venv/bin/python -m pytest -q tests/conformance

(`make conformance` does exactly this.) Nothing is written when any case failed, so
the table only ever shows a complete, passing run.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import pytest

from tests.conformance.harness import ONE_TASK_ATOL, RESULTS

HEADER = """# Conformance: real checkpoints in and out

Every row is measured by `tests/conformance/` (regenerate with `make conformance`): a tiny
model of the architecture is built from its transformers config (random init), fine-tuned
by {steps} AdamW steps and saved by its own tool (`save_pretrained`, `peft`,
`sentence-transformers`, or a DDP / `torch.compile` state dict through safetensors); the
base is saved in the layout named. Through the pipeline (`base add`, `fold`,
`materialize`), then loaded back with the fine-tune's own class:

- **1 task, `--master`**: largest absolute difference between the materialized model's
  outputs (logits; embeddings for sentence-transformers) and the fine-tune's on fixed
  inputs; must be at most {atol:g};
- **3 tasks, defaults**: three fine-tunes folded into one bundle, each materialized from
  the int4 serving copy with the data-free lambda; the least, over the three, argmax
  agreement with its fine-tune on fixed inputs (least embedding cosine for
  sentence-transformers);
  task seeds are drawn afresh in every run, so this column moves by several points
  between runs (84-100% seen over five runs); the suite requires 75%;
- **recorded**: what the manifest recorded for the task (randes.keymap's decision table:
  prefix mapping, stripped training wrappers, base tensors absent from the fine-tune,
  ties per config.json, the task's dtype, adapter source, weights subfolder).

The published all-MiniLM-L6-v2 as base (a real 22.7M-parameter model with the
`position_ids` buffer transformers 5 no longer saves, four fine-tunes):
[conformance_minilm.md](conformance_minilm.md).

Measured {date} on {machine}, Python {python}, torch {torch}, transformers
{transformers}, peft {peft}, sentence-transformers {st}; {n} cases in {seconds:.0f} s.

"""
TABLE = (
    "| architecture | fine-tune | saved as | base layout | 1 task, master: max abs diff "
    "| 3 tasks, defaults | recorded |\n|---|---|---|---|---|---|---|\n"
)


def _versions() -> dict[str, str]:
    import peft
    import sentence_transformers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "st": sentence_transformers.__version__,
    }


_started: list[float] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    import time

    _started.append(time.monotonic())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import time

    target = os.environ.get("RANDES_CONFORMANCE_DOC")
    if not target or exitstatus != 0 or not RESULTS:
        return
    from tests.conformance.models import STEPS

    text = (
        HEADER.format(
            steps=STEPS,
            atol=ONE_TASK_ATOL,
            date=dt.date.today().isoformat(),
            machine=f"{platform.machine()} Linux, {os.cpu_count()} CPUs",
            python=platform.python_version(),
            n=len(RESULTS),
            seconds=time.monotonic() - (_started[0] if _started else time.monotonic()),
            **_versions(),
        )
        + TABLE
    )
    for r in RESULTS:
        c = r.case
        third = (
            f"{r.three_task_agreement:.0%} argmax"
            if r.metric == "argmax agreement"
            else f"cosine {r.three_task_agreement:.5f}"
        )
        variant = c.variant + (f" ({'; '.join(r.notes)})" if r.notes else "")
        text += (
            f"| {c.arch} | `{c.task}` | {variant} | {c.layout} (`{c.base}`) | "
            f"{r.one_task_max_diff:.1e} | {third} | {r.recorded} |\n"
        )
    Path(target).write_text(text, encoding="utf-8")

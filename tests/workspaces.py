"""Workspaces and model sets that the pipeline and storage tests share.

Many test modules need the same thing: a workspace on a fresh home (on the embedded
default, or on a named store and registry), initialised and closed after the test, and a
base with a few fine-tunes of it. One helper each keeps those set-ups identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from storage.registry import Registry
from storage.settings import Settings
from storage.workspace import Workspace
from tests.factories import make_base, make_finetune

BACKENDS = ["local+sqlite", "s3+postgresql"]
"""``"<store>+<registry>"`` fixture params: the embedded default and the real services."""


def backend(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """``(registry url, store)`` of a fixture parametrized over ``BACKENDS``, from the
    service fixtures (``local_store``/``s3_store``, ``sqlite_url``/``postgres_url``)."""
    store_kind, registry_kind = request.param.split("+")
    store = request.getfixturevalue(f"{store_kind}_store")
    url = request.getfixturevalue("sqlite_url" if registry_kind == "sqlite" else "postgres_url")
    return url, store


def workspace_on(home: Path, url: str | None = None, store: Any = None) -> Workspace:
    """A workspace on ``home``: the embedded default, or the given registry and store."""
    registry = Registry(url) if url is not None else None
    return Workspace(Settings(home=home), store=store, registry=registry)


@contextmanager
def open_workspace(home: Path, url: str | None = None, store: Any = None) -> Iterator[Workspace]:
    """``workspace_on(...)``, initialised, closed when the block ends."""
    with workspace_on(home, url, store) as workspace:
        workspace.init()
        yield workspace


def make_models(
    root: Path,
    tasks: Iterable[str],
    prefixes: Mapping[str, str] | None = None,
    *,
    shapes: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """``{"base": dir, task: dir, ...}`` under ``root``: the tiny base and one fine-tune of
    it per task, seeded 1, 2, ... in order (``prefixes`` names a task's key prefix).

    With ``shapes`` every model is saved by transformers instead (`tests.hf_models`): a
    bare BertModel base and, per task, `save_finetune` with ``shapes[task]`` (absent: an
    fp32 sequence classifier), e.g. ``{"dtype": "bfloat16"}``."""
    if shapes is not None:
        from tests.hf_models import save_base, save_finetune

        base = save_base(root / "base")
        saved = {"base": base}
        for seed, task in enumerate(tasks, start=1):
            saved[task] = save_finetune(base, root / task, seed, **shapes.get(task, {}))
        return saved
    prefixes = prefixes or {}
    base = make_base(root / "base")
    found = {"base": base}
    for seed, task in enumerate(tasks, start=1):
        found[task] = make_finetune(base, root / task, seed, prefix=prefixes.get(task, ""))
    return found

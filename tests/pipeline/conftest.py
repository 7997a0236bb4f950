"""Fixtures of the pipeline tests: one Prefect test server per session, a RANDES home per test.

Flows open their own `Workspace` from the environment (``Workspace.open()`` reads
``RANDES_*``), exactly as a deployed run would, so tests point the environment at a
temporary home instead of passing objects in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from randes.config import TransformConfig
from storage.workspace import Workspace
from tests.hf_models import save_base

BASE = "tiny"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API server (SQLite) for the whole session: it takes ~10 s to start."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    # A loaded CI machine can take much longer than Prefect's default 30 s to boot it.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def randes_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``RANDES_HOME`` in the test's temp dir, every other ``RANDES_*`` variable unset."""
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("RANDES_HOME", str(home))
    return home


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """The base `new_bundle` registers: a tiny bare BertModel saved by transformers."""
    return save_base(tmp_path / "models" / "base")


@pytest.fixture
def new_bundle(randes_home: Path, base_dir: Path) -> Callable[..., None]:
    """``randes init`` + ``base add`` + ``bundle create`` on the environment's workspace.

    A function, so a test can first point the environment elsewhere (an S3 store).
    """

    def create(bundle: str, *, gate_threshold: float | None = None, **transform: Any) -> None:
        with Workspace.open() as ws:
            ws.init()
            ws.add_base(BASE, str(base_dir))
            ws.create_bundle(
                bundle,
                BASE,
                TransformConfig.model_validate(transform),
                gate_threshold=gate_threshold,
            )

    return create

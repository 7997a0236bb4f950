"""Bundles of tiny transformers models, folded through a real workspace and pulled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from randes.config import TransformConfig
from storage.settings import Settings
from storage.workspace import Workspace
from tests.runtime.hf_models import make_models


@dataclass
class Served:
    arch: str
    settings: Settings
    models: dict[str, Path]
    tasks: list[str]
    pulled: Path
    pulled_master: Path
    root: Path

    def workspace(self) -> Workspace:
        return Workspace(self.settings)


def _serve(root: Path, arch: str, config: TransformConfig) -> Served:
    models = make_models(root / "models", arch)
    settings = Settings(home=root / "home")
    with Workspace(settings) as ws:
        ws.init()
        ws.add_base("base", str(models["base"]))
        ws.create_bundle("b", "base", config)
        tasks = sorted(k for k in models if k != "base")
        for task in tasks:
            ws.fold("b", str(models[task]), task)
        ws.pull("b", None, root / "pulled")
        ws.pull("b", None, root / "pulled-master", master=True)
    return Served(arch, settings, models, tasks, root / "pulled", root / "pulled-master", root)


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Served:
    root = tmp_path_factory.mktemp(f"served-{request.param}")
    return _serve(root, request.param, TransformConfig())


@pytest.fixture(scope="module")
def served_flip(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """GPT-2 with rank-1 tensors superposed (flipped) rather than private."""
    root = tmp_path_factory.mktemp("served-flip")
    return _serve(root, "gpt2", TransformConfig(rank1="flip"))


@pytest.fixture
def ws(served: Served) -> Iterator[Workspace]:
    with served.workspace() as workspace:
        yield workspace

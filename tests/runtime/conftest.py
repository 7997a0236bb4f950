"""Bundles of tiny transformers models, folded through a real workspace and pulled."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _serve(root: Path, arch: str, config: TransformConfig, **model: Any) -> Served:
    models = make_models(root / "models", arch, **model)
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
    # a map that acts on rows and columns only, so that mixed-task batches run unmaterialized
    # (the default elementwise map has no such structure: see served_elementwise)
    return _serve(root, request.param, TransformConfig(map="two-sided", rank1="private"))


@pytest.fixture(scope="module")
def served_flip(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """GPT-2 with rank-1 tensors superposed (flipped) rather than private."""
    root = tmp_path_factory.mktemp("served-flip")
    return _serve(root, "gpt2", TransformConfig(map="two-sided", rank1="flip"))


@pytest.fixture(scope="module")
def served_elementwise(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """GPT-2 in a bundle of the default config (elementwise signs, rank-1 tensors flipped)."""
    root = tmp_path_factory.mktemp("served-elementwise")
    return _serve(root, "gpt2", TransformConfig())


@pytest.fixture(scope="module")
def served_wide(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """GPT-2 (default config) whose embedding spans several 2 MiB pages of every input:
    16 MiB of base, 2 MiB of int4 codes, 512 KiB of sign stream (large enough that its
    signs are kept, randes.retrieve.SIGNS_AHEAD_MIN, and its pages dropped as passed)."""
    root = tmp_path_factory.mktemp("served-wide")
    return _serve(root, "gpt2", TransformConfig(), tasks=3, steps=2, vocab_size=32768, n_embd=128)


@pytest.fixture
def ws(served: Served) -> Iterator[Workspace]:
    with served.workspace() as workspace:
        yield workspace

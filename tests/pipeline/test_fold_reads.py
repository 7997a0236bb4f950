"""A fold reads and hashes its checkpoint once: the digest it records is derived from
the bytes it folded, the file-bytes digest of the era before content digests is
computed only while the bundle's ledger holds rows of that era, and a refold is still
a no-op whatever name it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

import randes.digests
import storage.folding
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import source_digests
from storage.registry.models import IngestionLedger
from storage.settings import Settings
from storage.workspace import Workspace
from tests.factories import make_base, make_finetune


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Each hashing pass a fold makes: a pass of its own (source_digests), the digest
    derived from the fold's reads (read_digests), and whether each computed the
    file-bytes digest."""
    calls: dict[str, list[bool]] = {"alone": [], "while folding": []}

    def spy(name: str, real: Any) -> Any:
        def hashing(reader: Any, *, legacy: bool = name == "alone") -> Any:
            calls[name].append(legacy)
            return real(reader, legacy=legacy)

        return hashing

    monkeypatch.setattr(storage.folding, "source_digests", spy("alone", source_digests))
    monkeypatch.setattr(
        storage.folding, "read_digests", spy("while folding", randes.digests.read_digests)
    )
    return calls


def test_a_fold_hashes_its_checkpoint_once_and_a_refold_is_a_no_op(
    tmp_path: Path, hashes: dict[str, list[bool]]
) -> None:
    base = make_base(tmp_path / "base")
    tasks = [make_finetune(base, tmp_path / f"t{k}", k) for k in (1, 2)]
    with Workspace(Settings(home=tmp_path / "home")) as ws:
        ws.init()
        ws.add_base("tiny", str(base))
        ws.create_bundle("b", "tiny", TransformConfig())
        ws.fold("b", str(tasks[0]), "one")
        assert hashes == {"alone": [], "while folding": [False]}
        with CheckpointReader.open(tasks[0]) as reader:
            digest = source_digests(reader).content
        assert ws.registry.tasks("b")[0].source_sha256 == digest
        assert ws.registry.ledger_lookup("b", digest) == ("one", 1)
        assert not ws.registry.holds_file_digests("b")

        # the same bytes under a new name: folded, found in the ledger, nothing committed
        again = ws.fold("b", str(tasks[0]), "two")
        assert again.skipped and (again.task, again.version) == ("one", 1)
        # under the name it holds: hashed alone, no fold needed to tell
        hashes["alone"].clear()
        assert ws.fold("b", str(tasks[0]), "one").skipped
        assert hashes["alone"] == [False]
        assert [v.version for v in ws.registry.list_versions("b")] == [1]

        # a row of the era before content digests: the file-bytes digest is computed too
        with ws.registry._tx(write=True) as s:  # noqa: SLF001 - a registry of that era
            s.execute(update(IngestionLedger).values(digest_kind=None))
        assert ws.registry.holds_file_digests("b")
        hashes["while folding"].clear()
        ws.fold("b", str(tasks[1]), "two")
        assert hashes["while folding"] == [True]

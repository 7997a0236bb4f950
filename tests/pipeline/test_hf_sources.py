"""Hugging Face sources, resolved by huggingface_hub itself from an offline cache.

The hub is unreachable from test machines, so each test lays out a cache exactly as
huggingface_hub writes one (``models--org--repo/{blobs,snapshots/<commit>,refs/<branch>}``,
snapshot files being relative symlinks to content-named blobs) and runs with
``HF_HUB_OFFLINE=1``. What must hold:

- the registry records the commit a revision resolved to (``hf://org/repo@<sha>``),
  whether the source was given bare, ``@main`` or by commit;
- ``remove`` fetches the source again by that pinned uri (moving ``main`` afterwards
  changes nothing) and refuses when the cached bytes no longer match their sha256;
- ``randes ingest`` takes a comma-separated list of ``hf://`` repositories.

What the cache holds is what ``save_pretrained`` writes (config.json, model.safetensors):
tiny BERT fine-tunes over a bare ``BertModel`` base, fp32, bf16 or without the pooler.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from randes.errors import CheckpointError, IntegrityError
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

ORG = "randes-tests"
SHA40 = r"[0-9a-f]{40}"
SHAPES: dict[int, dict[str, Any]] = {
    2: {"dtype": "bfloat16"},
    3: {"task": "BertForTokenClassification"},
}
"""Fine-tune seed -> how it was saved (others: an fp32 sequence classifier)."""


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """The base `new_bundle` registers: a bare BertModel saved by transformers."""
    return save_base(tmp_path / "models" / "base")


def make_finetune(base_dir: Path, directory: Path, seed: int) -> Path:
    return save_finetune(base_dir, directory, seed, **SHAPES.get(seed, {}))


# --------------------------------------------------------------- the cache
@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in the test's temp dir, offline mode on."""
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, when first imported: keep its
    # module constants in step with the environment for this test.
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hf_commit(cache: Path, repo_id: str, model_dir: Path, *, ref: str | None = "main") -> str:
    """Put ``model_dir``'s files in the cache as one commit of ``repo_id``; return its sha.

    The layout huggingface_hub's downloads produce: LFS files (safetensors) stored as
    ``blobs/<sha256>``, plain git files (json) as ``blobs/<git sha1>``, every snapshot
    file a relative symlink to its blob, and ``refs/<ref>`` holding the commit sha
    (no trailing newline).
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    tree = hashlib.sha1(repo_id.encode())
    blobs: dict[str, str] = {}
    for path in files:
        data = path.read_bytes()
        lfs = path.suffix == ".safetensors"
        blobs[path.name] = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        tree.update(path.name.encode() + b"\0" + blobs[path.name].encode())
    commit = tree.hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files:
        blob = repo / "blobs" / blobs[path.name]
        if not blob.exists():
            blob.write_bytes(path.read_bytes())
        link = snapshot / path.name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def _pinned(ws: Workspace, bundle: str) -> dict[str, str]:
    return {t.name: t.source_uri for t in ws.registry.tasks(bundle)}


# ------------------------------------------------------------------- tests
def test_cache_layout_resolves_offline_through_huggingface_hub(
    hf_cache: Path, base_dir: Path, tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    commit = hf_commit(hf_cache, f"{ORG}/alpha", make_finetune(base_dir, tmp_path / "a", 1))
    patterns = ["*.safetensors", "*.json"]
    for revision in (None, "main", commit):
        got = Path(snapshot_download(f"{ORG}/alpha", revision=revision, allow_patterns=patterns))
        assert got == hf_cache / f"models--{ORG}--alpha" / "snapshots" / commit
        assert sorted(p.name for p in got.iterdir()) == ["config.json", "model.safetensors"]


def test_registry_pins_the_resolved_commit_and_remove_fetches_by_it(
    hf_cache: Path,
    new_bundle: Callable[..., None],
    base_dir: Path,
    tmp_path: Path,
) -> None:
    new_bundle("b")
    alpha = make_finetune(base_dir, tmp_path / "alpha", 1)
    beta = make_finetune(base_dir, tmp_path / "beta", 2)
    gamma = make_finetune(base_dir, tmp_path / "gamma", 3)
    c_alpha = hf_commit(hf_cache, f"{ORG}/alpha", alpha)
    c_beta = hf_commit(hf_cache, f"{ORG}/beta", beta)
    c_gamma = hf_commit(hf_cache, f"{ORG}/gamma", gamma, ref=None)  # reachable by commit only

    with Workspace.open() as ws:
        ws.fold("b", f"hf://{ORG}/alpha", "alpha", scale=1.0)
        ws.fold("b", f"hf://{ORG}/beta@main", "beta", scale=1.0)
        ws.fold("b", f"hf://{ORG}/gamma@{c_gamma}", "gamma", scale=1.0)
        pinned = _pinned(ws, "b")
        assert pinned == {
            "alpha": f"hf://{ORG}/alpha@{c_alpha}",
            "beta": f"hf://{ORG}/beta@{c_beta}",
            "gamma": f"hf://{ORG}/gamma@{c_gamma}",
        }
        manifest = ws.resolve("b")[1]
        assert {t.name: t.source_uri for t in manifest.tasks} == pinned
        # The same bytes under another revision spelling are still the same checkpoint.
        again = ws.fold("b", f"hf://{ORG}/alpha@{c_alpha}", "alpha-again")
        assert again.skipped and again.task == "alpha"

        # `main` moves on to new bytes: removal must fetch the folded commit, not main.
        hf_commit(hf_cache, f"{ORG}/beta", make_finetune(base_dir, tmp_path / "beta2", 22))
        outcome = ws.remove("b", "beta")
        assert outcome.version == 4
        assert [t.name for t in ws.resolve("b")[1].tasks] == ["alpha", "gamma"]

        assert ws.remove("b", "gamma").version == 5  # by commit, no ref at all

        # Both removals subtracted exactly what was folded: alpha alone comes back exact.
        out = ws.materialize("b", None, "alpha", tmp_path / "out", master=True)
        out = out / "model.safetensors"
        got, want = load_file(str(out)), load_file(str(alpha / "model.safetensors"))
        for name, tensor in want.items():
            if tensor.is_floating_point():
                err = (got[name].double() - tensor.double()).abs().max()
                assert float(err / tensor.double().abs().max()) < 1e-4, name


def test_remove_refuses_when_the_cached_bytes_changed(
    hf_cache: Path, new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    new_bundle("b")
    commit = hf_commit(hf_cache, f"{ORG}/alpha", make_finetune(base_dir, tmp_path / "alpha", 1))
    with Workspace.open() as ws:
        ws.fold("b", f"hf://{ORG}/alpha", "alpha")
        ws.fold("b", str(make_finetune(base_dir, tmp_path / "beta", 2)), "beta")
        # Someone rewrites the cached blob behind the pinned commit.
        snapshot = hf_cache / f"models--{ORG}--alpha" / "snapshots" / commit
        blob = (snapshot / "model.safetensors").resolve()
        other = make_finetune(base_dir, tmp_path / "other", 7) / "model.safetensors"
        blob.write_bytes(other.read_bytes())

        with pytest.raises(IntegrityError, match=r"changed since it was folded") as err:
            ws.remove("b", "alpha")
        assert f"hf://{ORG}/alpha@{commit}" in str(err.value)
        assert ws.registry.head("b").version == 2  # type: ignore[union-attr]
        assert [t.name for t in ws.resolve("b")[1].tasks] == ["alpha", "beta"]

        with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
            ws.fold("b", f"hf://{ORG}/never-downloaded", "missing")


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_of_a_comma_separated_list_of_hf_sources(
    hf_cache: Path, new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    from flows.discovery import discover
    from flows.pipeline import ingest_flow
    from storage.settings import load_settings

    new_bundle("b", gate_threshold=0.5)
    c_alpha = hf_commit(hf_cache, f"{ORG}/alpha", make_finetune(base_dir, tmp_path / "a", 1))
    c_beta = hf_commit(hf_cache, f"{ORG}/beta", make_finetune(base_dir, tmp_path / "b", 2))
    source = f"hf://{ORG}/beta@main, hf://{ORG}/alpha"

    found = discover(source, settings=load_settings())
    assert [(c.task, c.source) for c in found] == [
        ("alpha", f"hf://{ORG}/alpha"),
        ("beta", f"hf://{ORG}/beta@main"),
    ]

    summary = ingest_flow("b", source)
    assert summary["folded"] == ["alpha", "beta"] and summary["version"] == 1  # one batch
    assert summary["status"] == "validated"  # validation re-fetched both by pinned uri
    again = ingest_flow("b", source)
    assert again["folded"] == [] and again["skipped"] == ["alpha", "beta"]

    with Workspace.open() as ws:
        assert _pinned(ws, "b") == {
            "alpha": f"hf://{ORG}/alpha@{c_alpha}",
            "beta": f"hf://{ORG}/beta@{c_beta}",
        }
        cosines = {
            e.task_name: e.value
            for e in ws.registry.evaluations("b", 1)
            if e.metric == "delta_cosine"
        }
        assert set(cosines) == {"alpha", "beta"}
        assert all(v > 0.5 for v in cosines.values()), cosines

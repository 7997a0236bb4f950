"""Quantized serving artifacts through the workspace and the command line, real stores.

- a fold commits the serving shards next to the master, in the manifest and in the
  version's object references;
- materialize serves the quantized copy by default, within the quantization error bound
  of the master's result; ``master=True`` is bit for bit what retrieval from the fp32
  master gives (the path every version took before serving copies existed);
- pull downloads the serving copy and not the master (unless asked), and the pulled
  directory still materializes offline;
- gc keeps the serving objects of live versions and reclaims those of dropped ones;
- `randes bundle create` takes --serving / --group-size, refusing bad values in one line.

The models are saved by transformers' ``save_pretrained``: a tiny bare BertModel base,
sequence classifiers (alpha, beta) and a token classifier without the pooler (gamma)
trained two steps from it.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.quantize import QuantScheme
from randes.retrieve import retrieve
from storage.cache import version_context
from storage.pulled import PulledVersion, PulledVersionError
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune
from tests.workspaces import BACKENDS, backend, make_models, open_workspace


@pytest.fixture(params=BACKENDS)
def ws(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Workspace]:
    url, store = backend(request)
    with open_workspace(tmp_path / "home", url, store) as workspace:
        yield workspace


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once: the tests only read them."""
    tasks = ("alpha", "beta", "gamma")
    shapes = {"gamma": {"task": "BertForTokenClassification"}}
    return make_models(tmp_path_factory.mktemp("models"), tasks, shapes=shapes)


def _bundle(ws: Workspace, models: dict[str, Path], **config: Any) -> None:
    ws.add_base("tiny", str(models["base"]))
    ws.create_bundle("b", "tiny", TransformConfig.model_validate(config))


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _sizes(manifest: Any) -> tuple[int, int]:
    return (
        sum(r.size for r in manifest.superposition),
        sum(r.size for r in manifest.serving.shards),
    )


def test_materialize_serves_the_quantized_copy_and_master_on_request(
    ws: Workspace, models, tmp_path: Path
) -> None:
    _bundle(ws, models)
    ws.fold("b", str(models["alpha"]), "alpha")
    ws.fold("b", str(models["gamma"]), "gamma")
    record, manifest = ws.resolve("b")
    assert manifest.serving is not None and manifest.serving.scheme.name == "int4-g64"
    master_bytes, serving_bytes = _sizes(manifest)
    print(f"\nserving int4-g64: {serving_bytes} B vs master {master_bytes} B")
    assert serving_bytes < master_bytes / 3
    # the serving objects are references of the version (gc and integrity see them)
    assert {r.key for r in manifest.serving.shards} <= ws.registry.referenced_keys()

    for task in ("alpha", "gamma"):
        served = _load(ws.materialize("b", None, task, tmp_path / f"{task}-served"))
        master = _load(ws.materialize("b", None, task, tmp_path / f"{task}-master", master=True))
        # master: bit for bit what retrieval from the fp32 master superposition gives
        context = version_context("b", record.version)
        with ws.open_task(manifest, task, master=True) as opened:
            sup_files = [ws.cache.fetch(r, context=context) for r in manifest.superposition]
            with CheckpointReader.from_files(sup_files) as sup:
                assert type(opened.superposition) is CheckpointReader
                want = dict(
                    retrieve(
                        base=opened.base,
                        superposition=sup,
                        private=opened.private,
                        seed=opened.entry.seed,
                        key_map=opened.entry.key_map,
                        config=manifest.transform,
                        scale=ws.task_scale(manifest, opened.entry, opened.base),
                    )
                )
            lam = ws.task_scale(manifest, opened.entry, opened.base)
        assert master.keys() == want.keys() == served.keys()
        for name, tensor in want.items():
            assert torch.equal(master[name], tensor), name
        # served: within lambda * half the largest quantization step of the bundle
        scales = [ws.cache.fetch(r, context=context) for r in manifest.serving.shards]
        with CheckpointReader.from_files(scales) as codes:
            step = max(float(codes.get(n).max()) for n in codes if n.endswith(".scale"))
        differ = 0
        for name, tensor in want.items():
            err = float((served[name].double() - tensor.double()).abs().max())
            assert err <= lam * step / 2 * (1 + 1e-4) + 1e-6, name
            differ += not torch.equal(served[name], tensor)
        assert differ, "the served model should carry the rounding of the serving copy"
        head = "classifier.weight"  # private: verbatim
        assert torch.equal(served[head], master[head])


def test_a_bundle_without_serving_format_serves_its_master(ws: Workspace, models, tmp_path) -> None:
    _bundle(ws, models, serving=None)
    ws.fold("b", str(models["alpha"]), "alpha")
    manifest = ws.resolve("b")[1]
    assert manifest.serving is None and manifest.transform.serving is None
    served = _load(ws.materialize("b", None, "alpha", tmp_path / "s"))
    master = _load(ws.materialize("b", None, "alpha", tmp_path / "m", master=True))
    assert all(torch.equal(served[n], master[n]) for n in master)
    ws.pull("b", None, tmp_path / "pulled")  # a complete copy: the master is what it serves
    pulled = PulledVersion(tmp_path / "pulled")
    assert pulled.has_master
    again = _load(pulled.materialize("alpha", tmp_path / "offline"))
    assert all(torch.equal(again[n], master[n]) for n in master)


def test_pull_skips_the_master_and_the_pulled_dir_materializes(
    ws: Workspace, models, tmp_path: Path
) -> None:
    _bundle(ws, models, serving={"bits": 8, "group_size": None})
    ws.fold("b", str(models["alpha"]), "alpha")
    ws.fold("b", str(models["beta"]), "beta")
    _, manifest = ws.resolve("b")
    assert manifest.serving is not None and manifest.serving.scheme.name == "int8-row"

    dest = tmp_path / "pulled"
    ws.pull("b", None, dest)
    pointer = json.loads((dest / "bundle.json").read_text())
    assert (pointer["served"], pointer["master"]) == ("int8-row", False)
    assert not any((dest / r.key).exists() for r in manifest.superposition)
    for ref in manifest.shards():
        if ref not in manifest.superposition:
            assert (dest / ref.key).stat().st_size == ref.size
    pulled_bytes = sum(p.stat().st_size for p in (dest / "objects").rglob("*") if p.is_file())

    pulled = PulledVersion(dest)
    assert not pulled.has_master
    offline = _load(pulled.materialize("beta", tmp_path / "offline"))
    online = _load(ws.materialize("b", None, "beta", tmp_path / "online"))
    assert offline.keys() == online.keys()
    assert all(torch.equal(offline[n], online[n]) for n in online)
    with pytest.raises(PulledVersionError, match="--master"):
        pulled.materialize("beta", tmp_path / "offline-master", master=True)
    assert not (tmp_path / "offline-master").exists()

    full = tmp_path / "pulled-master"
    ws.pull("b", None, full, master=True)
    assert json.loads((full / "bundle.json").read_text())["master"] is True
    full_bytes = sum(p.stat().st_size for p in (full / "objects").rglob("*") if p.is_file())
    assert full_bytes - pulled_bytes == sum(r.size for r in manifest.superposition)
    exact = _load(PulledVersion(full).materialize("beta", tmp_path / "x", master=True))
    want = _load(ws.materialize("b", None, "beta", tmp_path / "y", master=True))
    assert all(torch.equal(exact[n], want[n]) for n in want)


def test_gc_keeps_live_serving_objects_and_reclaims_dropped_ones(
    ws: Workspace, models, tmp_path: Path
) -> None:
    _bundle(ws, models)
    for task in ("alpha", "beta", "gamma"):
        ws.fold("b", str(models[task]), task)
    manifests = {v: ws.resolve("b", str(v))[1] for v in (1, 2, 3)}
    keys = {v: {r.key for r in m.serving.shards} for v, m in manifests.items()}  # type: ignore[union-attr]
    masters = {v: {r.key for r in m.superposition} for v, m in manifests.items()}
    stored = {i.key for i in ws.store.list("")}
    assert keys[1] | keys[2] | keys[3] <= stored

    assert ws.gc(grace_s=0).deleted == []  # every version live: nothing goes
    ws.registry.delete_versions("b", [1])
    report = ws.gc(grace_s=0)
    dropped = (keys[1] | masters[1]) - keys[2] - keys[3] - masters[2] - masters[3]
    assert dropped and dropped <= set(report.deleted)
    stored = {i.key for i in ws.store.list("")}
    assert not dropped & stored
    assert keys[2] | keys[3] | masters[2] | masters[3] <= stored
    ws.materialize("b", "2", "beta", tmp_path / "after-gc")  # served from what gc kept


# ------------------------------------------------------------------ command line


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import os

    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANDES_HOME", str(tmp_path / "home"))
    base = save_base(tmp_path / "models" / "base")
    assert _cli("init")[0] == 0
    assert _cli("base", "add", "tiny", str(base))[0] == 0
    return tmp_path


@pytest.mark.parametrize(
    "options",
    [
        ["--serving", "int5"],
        ["--serving", ""],
        ["--serving", "fp8"],
        ["--group-size", "7"],
        ["--group-size", "0"],
        ["--group-size", "-64"],
        ["--group-size", "sixty"],
        ["--group-size", str((1 << 20) + 1)],
        ["--serving", "none", "--group-size", "64"],
    ],
)
def test_bad_serving_options_are_one_error_line(cli_home: Path, options: list[str]) -> None:
    code, out, err = _cli("bundle", "create", "b", "--base", "tiny", *options)
    lines = err.splitlines()
    assert code != 0 and "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    with Workspace.open() as ws:
        assert ws.registry.list_bundles() == []


@pytest.mark.parametrize(
    ("options", "want"),
    [
        ([], QuantScheme(bits=4, group_size=64)),
        (["--serving", "int8"], QuantScheme(bits=8, group_size=64)),
        (["--serving", "int3", "--group-size", "row"], QuantScheme(bits=3, group_size=None)),
        (["--group-size", "128"], QuantScheme(bits=4, group_size=128)),
        (["--serving", "none"], None),
    ],
)
def test_serving_options_set_the_bundle_format(
    cli_home: Path, options: list[str], want: QuantScheme | None
) -> None:
    code, out, err = _cli("bundle", "create", "b", "--base", "tiny", *options)
    assert code == 0, err
    with Workspace.open() as ws:
        assert ws.bundle_config("b").serving == want
    code, out, _ = _cli("versions", "b")
    assert code == 0 and f"serving {want.name if want else 'master'}" in out


def test_pull_and_materialize_master_flags(cli_home: Path) -> None:
    base = cli_home / "models" / "base"
    alpha = save_finetune(base, cli_home / "models" / "alpha", 1)
    assert _cli("bundle", "create", "b", "--base", "tiny")[0] == 0
    assert _cli("fold", "b", str(alpha), "--task", "alpha")[0] == 0
    assert _cli("pull", "b@1", str(cli_home / "p"))[0] == 0
    assert _cli("pull", "b@1", str(cli_home / "pm"), "--master")[0] == 0
    assert not json.loads((cli_home / "p" / "bundle.json").read_text())["master"]
    assert json.loads((cli_home / "pm" / "bundle.json").read_text())["master"]
    assert _cli("materialize", "b", "alpha", str(cli_home / "m"), "--master")[0] == 0
    assert _cli("materialize", "b", "alpha", str(cli_home / "s"))[0] == 0
    master, served = _load(cli_home / "m"), _load(cli_home / "s")
    assert not all(torch.equal(master[n], served[n]) for n in master)

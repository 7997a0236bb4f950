"""Links, hostile environments and broken promises of issue 16, through the command line.

Security: no file outside a checkpoint's directory is ever read through a link (side
files, the index's shards, the weights themselves), what is written is never group- or
world-writable, and credentials in an S3 endpoint URL's user info are never printed.

Then every input that used to end in a traceback (each must be one ``error:`` line, a
non-zero exit, and change nothing), and the other promises the probe found broken: a
read-only query that created directories and a database, a folder with a bad name that
stopped every scheduled ingest, a foreign object that stopped (or was deleted by) `gc`,
and a source path with a space or an accent that could never be removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from tests.hf_models import save_finetune, save_state
from tests.reliability.test_data_loss import (
    BASE,
    BUNDLE,
    Env,
    Models,
    _setup,
    _tasks,
    cli,
    leaves_registry_and_store,
    ok,
    refused,
)
from tests.reliability.test_data_loss import env as env  # noqa: F401 - fixture
from tests.reliability.test_data_loss import local as local  # noqa: F401 - fixture
from tests.reliability.test_data_loss import models as models  # noqa: F401 - fixture

RANDES = Path(sys.executable).parent / "randes"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _secret_file(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "credentials.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"aws_secret_access_key": "TOP-SECRET-VALUE"}')
    secret.chmod(0o600)
    return secret


# ------------------------------------------------------------------ links
def test_side_file_linked_out_of_the_checkpoint_is_refused(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _setup(models, "a")
    ckpt = _copy(models.tasks["b"], tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(_secret_file(tmp_path))
    with leaves_registry_and_store(local.home):
        refused("fold", BUNDLE, str(ckpt), "--task", "b", needle="outside the checkpoint directory")
        refused("base", "add", "other", str(ckpt), needle="outside the checkpoint directory")
    assert not any(b"TOP-SECRET" in p.read_bytes() for p in local.home.rglob("*") if p.is_file())


def test_shard_linked_out_of_the_checkpoint_is_refused(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _setup(models, "a")
    ckpt = tmp_path / "sharded"
    ckpt.mkdir()
    save_torch_state_dict(
        load_file(str(models.tasks["b"] / "model.safetensors")), str(ckpt), max_shard_size=40_000
    )
    shard = sorted(ckpt.glob("model-*.safetensors"))[-1]
    moved = tmp_path / "elsewhere" / shard.name
    moved.parent.mkdir()
    shard.rename(moved)
    shard.symlink_to(moved)
    with leaves_registry_and_store(local.home):
        refused("fold", BUNDLE, str(ckpt), "--task", "b", needle="outside the checkpoint directory")
        (ckpt / "model.safetensors.index.json").rename(tmp_path / "index.json")  # no index:
        refused("fold", BUNDLE, str(ckpt), "--task", "b", needle="outside the checkpoint directory")


def test_weights_linked_out_of_the_checkpoint_are_refused(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _setup(models, "a")
    ckpt = tmp_path / "linked"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(models.tasks["b"] / "model.safetensors")
    with leaves_registry_and_store(local.home):
        refused("fold", BUNDLE, str(ckpt), "--task", "b", needle="outside the checkpoint directory")


def test_links_inside_the_checkpoint_and_a_linked_source_are_followed(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _setup(models, "a")
    ckpt = tmp_path / "inside"
    (ckpt / "blobs").mkdir(parents=True)
    shutil.copy(models.tasks["b"] / "model.safetensors", ckpt / "blobs" / "w")
    shutil.copy(models.tasks["b"] / "config.json", ckpt / "blobs" / "c")
    (ckpt / "model.safetensors").symlink_to("blobs/w")
    (ckpt / "config.json").symlink_to(ckpt / "blobs" / "c")
    link = tmp_path / "latest"
    link.symlink_to(ckpt)  # the source the user names may itself be a link
    ok("fold", BUNDLE, str(link), "--task", "b")
    out = tmp_path / "out"
    ok("materialize", BUNDLE, "b", str(out))
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o022 == 0, (path, oct(path.stat().st_mode))
    for path in [p for p in local.home.rglob("*") if p.is_file()]:
        assert path.stat().st_mode & 0o022 == 0, (path, oct(path.stat().st_mode))


# ------------------------------------------------------------ credentials
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_credentials_in_the_endpoint_url_are_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith(("RANDES_", "AWS_"))]:
        monkeypatch.delenv(name)
    port = _closed_port()
    env = dict(
        os.environ,
        RANDES_HOME=str(tmp_path / "home"),
        RANDES_STORE_URL="s3://bucket/prefix",
        RANDES_S3_ENDPOINT_URL=f"http://AKIAENDPOINTUSER:s3cr%40t-in-url@127.0.0.1:{port}/",
        RANDES_S3_RETRY_SECONDS="0.5",
        AWS_ACCESS_KEY_ID="AKIAOTHERKEY",
        AWS_SECRET_ACCESS_KEY="other-secret-key",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    for argv in (["init"], ["gc"], ["pull", "b", str(tmp_path / "dest")]):
        proc = subprocess.run(
            [str(RANDES), *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 1, proc
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        for secret in ("AKIAENDPOINTUSER", "s3cr%40t", "s3cr@t", "other-secret-key"):
            assert secret not in proc.stderr + proc.stdout, (secret, proc.stderr)


# ------------------------------------------------ tracebacks -> one line
def _bundle_ready(models: Models) -> None:  # noqa: F811
    _setup(models, "a")


def test_version_numbers_past_int64_are_one_line(local: Env, models: Models) -> None:  # noqa: F811
    _bundle_ready(models)
    dest = local.home.parent / "dest"
    with leaves_registry_and_store(local.home):
        for ref in (str(2**64), str(2**31), "9" * 40):
            refused("materialize", f"{BUNDLE}@{ref}", "a", str(dest), needle="no version")
            refused("pull", f"{BUNDLE}@{ref}", str(dest), needle="no version")
            refused("validate", BUNDLE, "--version", ref, needle="no version")
            refused("publish", BUNDLE, "--version", ref, needle="no version")
    assert not dest.exists()


def test_destination_below_a_file_or_a_link_is_one_line(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _bundle_ready(models)
    regular = tmp_path / "regular"
    regular.write_text("x")
    linked = tmp_path / "linked"
    (tmp_path / "real").mkdir()
    linked.symlink_to(tmp_path / "real")
    for dest in (regular / "sub", regular / "a" / "b", linked):
        refused("materialize", BUNDLE, "a", str(dest), needle=str(dest))
        refused("pull", BUNDLE, str(dest), needle=str(dest))
    assert list((tmp_path / "real").iterdir()) == []
    assert regular.read_text() == "x"


def test_damaged_registry_database_is_one_line(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bundle_ready(models)
    data = (local.home / "registry.db").read_bytes()
    cases = {
        "truncated": data[: len(data) // 3],
        "garbage": b"definitely not SQLite " * 500,
        "empty-header": b"SQLite format 3\x00" + b"\x00" * 4000,
    }
    for name, blob in cases.items():
        db = tmp_path / f"{name}.db"
        db.write_bytes(blob)
        monkeypatch.setenv("RANDES_DATABASE_URL", f"sqlite:///{db}")
        for argv in (
            ["tasks"],
            ["versions", BUNDLE],
            ["fold", BUNDLE, str(models.tasks["b"]), "--task", "b"],
            ["gc"],
        ):
            result = cli(*argv)
            assert result.code == 1, (name, argv, result)
            lines = result.err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, argv, result)
        assert db.read_bytes() == blob, name


def test_home_or_cache_being_a_file_is_one_line(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bundle_ready(models)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    monkeypatch.setenv("RANDES_CACHE_DIR", str(a_file))
    refused("fold", BUNDLE, str(models.tasks["b"]), "--task", "b", needle="RANDES_CACHE_DIR")
    refused("materialize", BUNDLE, "a", str(tmp_path / "out"), needle="RANDES_CACHE_DIR")
    monkeypatch.delenv("RANDES_CACHE_DIR")
    for name in ("RANDES_DATABASE_URL", "RANDES_STORE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANDES_HOME", str(a_file))
    refused("init", needle=str(a_file))
    refused("tasks", needle="run `randes init`")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize(
    "variable,value,needle",
    [
        ("RANDES_DATABASE_URL", "not a url at all", "RANDES_DATABASE_URL"),
        ("RANDES_DATABASE_URL", "postgresql+nosuchdriver://u:pw@h/db", "RANDES_DATABASE_URL"),
        ("RANDES_S3_ENDPOINT_URL", "garbage", "RANDES_S3_ENDPOINT_URL"),
        ("RANDES_S3_RETRY_SECONDS", "abc", "RANDES_S3_RETRY_SECONDS"),
        ("RANDES_S3_RETRY_SECONDS", "-1", "RANDES_S3_RETRY_SECONDS"),
        ("RANDES_TORCH_THREADS", "0", "RANDES_TORCH_THREADS"),
        ("RANDES_TORCH_THREADS", "many", "RANDES_TORCH_THREADS"),
    ],
)
def test_garbage_settings_are_one_line(
    variable: str,
    value: str,
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("RANDES_HOME", str(home))
    if variable == "RANDES_S3_ENDPOINT_URL":
        monkeypatch.setenv("RANDES_STORE_URL", "s3://bucket/prefix")
    monkeypatch.setenv(variable, value)
    for argv in (["init"], ["tasks"]):
        line = refused(*argv, needle=needle if argv == ["init"] else "")
        assert "pw" not in line.replace("pw@", "") or variable != "RANDES_DATABASE_URL"
    assert not home.exists()


def test_float8_tensors_fold_and_materialize(local: Env, models: Models) -> None:  # noqa: F811
    _bundle_ready(models)
    state = load_file(str(models.tasks["b"] / "model.safetensors"))
    state["quant.scale"] = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float8_e4m3fn)
    state["quant.other"] = torch.tensor([1.0, -2.0], dtype=torch.float8_e5m2)
    # float8 tensors no transformers class declares: written by hand, next to b's config
    ckpt = save_state(models.root / "f8", state, like=models.tasks["b"])
    ok("fold", BUNDLE, str(ckpt), "--task", "f8")
    out = local.home.parent / "out-f8"
    ok("materialize", BUNDLE, "f8", str(out))
    got = load_file(str(out / "model.safetensors"))
    assert got["quant.scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(got["quant.scale"].float(), state["quant.scale"].float())
    nan8 = dict(state)
    nan8["quant.scale"] = torch.tensor([float("nan")], dtype=torch.float32).to(torch.float8_e4m3fn)
    bad = save_state(models.root / "f8-nan", nan8, like=models.tasks["b"])
    refused("fold", BUNDLE, str(bad), "--task", "f8nan", needle="NaN or Inf")


def test_absurd_scale_is_refused_before_anything_runs(local: Env, models: Models) -> None:  # noqa: F811
    _bundle_ready(models)
    out = str(local.home.parent / "out")
    with leaves_registry_and_store(local.home):
        for value in ("1e300", "1e4", "inf"):
            for argv in (
                ["fold", BUNDLE, str(models.tasks["b"]), "--task", "b", "--scale", value],
                ["materialize", BUNDLE, "a", out, "--scale", value],
                ["bundle", "create", "other", "--base", BASE, "--scale", value],
            ):
                result = cli(*argv)
                assert result.code == 2, (argv, result)
                assert len(result.err.splitlines()) == 1 and "--scale" in result.err, result


def test_read_only_store_is_one_line(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
) -> None:
    """A store directory on a read-only mount (EROFS binds root too, unlike chmod)."""
    _bundle_ready(models)
    store = local.home / "store"
    try:
        subprocess.run(["mount", "--bind", str(store), str(store)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here (needs root or CAP_SYS_ADMIN): {exc}")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(store)], check=True, capture_output=True
        )
        with leaves_registry_and_store(local.home):
            refused("fold", BUNDLE, str(models.tasks["b"]), "--task", "b", needle="Read-only")
    finally:
        subprocess.run(["umount", str(store)], check=False, capture_output=True)
    ok("fold", BUNDLE, str(models.tasks["b"]), "--task", "b")


# ------------------------------------------------------- other promises
def test_read_only_query_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "fresh-home"
    monkeypatch.setenv("RANDES_HOME", str(home))
    for argv in (["tasks"], ["tasks", "b", "--json"], ["versions", "b"]):
        refused(*argv, needle="run `randes init`")
    assert not home.exists()


def test_a_folder_with_a_bad_name_does_not_stop_ingest(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _bundle_ready(models)
    incoming = tmp_path / "incoming"
    save_finetune(models.base, incoming / "bad name!", 21)
    save_finetune(models.base, incoming / "good", 22)
    save_finetune(models.base, incoming / "zz-after", 23)
    line = refused("ingest", BUNDLE, str(incoming), "--no-validate", needle="bad name!")
    assert "folded 2, refused 1" in line, line
    assert set(_tasks()) == {"a", "good", "zz-after"}


def test_gc_leaves_foreign_objects_alone(env: Env, models: Models) -> None:  # noqa: F811
    _bundle_ready(models)
    from storage.workspace import Workspace

    with Workspace(env.settings) as ws:
        ws.store.put_bytes("notes/readme.txt", b"someone else's", if_absent=True)
        ws.store.put_bytes("objects/zz/not-a-digest", b"x", if_absent=True)
        orphan = "objects/" + "ab" + "/" + "ab" + "0" * 62
        ws.store.put_bytes(orphan, b"an orphan of a dead fold", if_absent=True)
    result = ok("gc", "--grace", "0")
    assert "deleted 1 objects" in result.out, result
    with Workspace(env.settings) as ws:
        assert ws.store.exists("notes/readme.txt")
        assert ws.store.exists("objects/zz/not-a-digest")
        assert not ws.store.exists(orphan)
    ok("materialize", BUNDLE, "a", str(env.home.parent / "out"))


def test_source_path_with_spaces_and_accents_can_be_removed(
    local: Env,  # noqa: F811
    models: Models,  # noqa: F811
    tmp_path: Path,
) -> None:
    _bundle_ready(models)
    odd = save_finetune(models.base, tmp_path / "modèles d'été" / "tâche #1 %20", 31)
    ok("fold", BUNDLE, str(odd), "--task", "odd")
    assert "%" in _tasks()["odd"]["source_uri"]  # recorded as a file:// uri
    assert "removes task 'odd'" in ok("remove", BUNDLE, "odd").out
    assert set(_tasks()) == {"a"}

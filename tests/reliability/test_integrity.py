"""Integrity: every read verifies sha256, and damage is reported where it lies.

On a local store and on a real S3 server (SeaweedFS), one byte is flipped in a stored
object of bundle ``b`` version 2 (its fp32 master superposition shard, its quantized
serving shard, task alpha's private shard, alpha's side file config.json, the version
manifest, a base shard, the base manifest); then, each with an empty cache and
``--master`` for the master shard (only the master path reads it):

- ``randes pull`` fails,
- ``randes materialize`` fails,
- validation (`flows.validation.validate_task`, what the validate flow runs per task)
  fails,

each with one error line (an `IntegrityError`) naming the damaged object's key and the
bundle version ("bundle b version 2") or base ("base tiny") it belongs to, and nothing
is written at DEST (no directory, no staging leftover). ``randes validate`` (the flow
through the command line) is held to the same one line once.

What the local cache may and may not hide (the decision documented in storage/cache.py):

- `pull` reads every object from the store: a damaged store object is reported even
  when a verified copy sits in the cache;
- materialize and validate read through the cache, whose copies are verified (hashed
  again by every new process): with a warm cache they produce the correct model from
  the verified copies even though the store's copy is damaged;
- a damaged cached copy is a cache miss: removed, fetched again from the store with a
  warning, and the command succeeds; if the store's copy is damaged as well, the error
  names the store object and the version.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import main
from flows.validation import validate_task
from randes.config import TransformConfig
from randes.errors import IntegrityError
from storage.cache import file_sha256
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

BUNDLE = "b"
BASE = "tiny"
VERSION = 2


@dataclass
class World:
    kind: str
    root: Path
    env: dict[str, str]
    keys: dict[str, str]  # target -> object key
    flip: Callable[[str], bytes]  # flips one byte of a stored object, returns the original
    put: Callable[[str, bytes], None]  # writes an object back

    def settings(self, cache: Path) -> Settings:
        return Settings(
            home=Path(self.env["RANDES_HOME"]),
            store_url=self.env["RANDES_STORE_URL"],
            s3_endpoint_url=self.env.get("RANDES_S3_ENDPOINT_URL"),
            s3_retry_seconds=2.0,
            cache_dir=cache,
        )

    @contextlib.contextmanager
    def damaged(self, target: str) -> Iterator[str]:
        key = self.keys[target]
        original = self.flip(key)
        try:
            yield key
        finally:
            self.put(key, original)


def _flipped(data: bytes) -> bytes:
    blob = bytearray(data)
    blob[len(blob) // 2] ^= 0x01
    return bytes(blob)


def _build(kind: str, root: Path, store_url: str, extra_env: dict[str, str]) -> dict[str, str]:
    env = {
        "RANDES_HOME": str(root / "home"),
        "RANDES_STORE_URL": store_url,
        "RANDES_S3_RETRY_SECONDS": "2",
        **extra_env,
    }
    settings = Settings(
        home=Path(env["RANDES_HOME"]),
        store_url=store_url,
        s3_endpoint_url=env.get("RANDES_S3_ENDPOINT_URL"),
        s3_retry_seconds=2.0,
        cache_dir=root / "setup-cache",
    )
    # a tiny bare BertModel and two sequence classifiers trained from it, saved by
    # transformers' ``save_pretrained``
    base = save_base(root / "models" / "base")
    with Workspace(settings) as ws:
        ws.init()
        ws.add_base(BASE, str(base))
        ws.create_bundle(BUNDLE, BASE, TransformConfig())
        ws.fold(BUNDLE, str(save_finetune(base, root / "models" / "alpha", 1)), "alpha")
        ws.fold(BUNDLE, str(save_finetune(base, root / "models" / "beta", 2)), "beta")
    return env


def _keys(settings: Settings) -> dict[str, str]:
    with Workspace(settings) as ws:
        record, manifest = ws.resolve(BUNDLE)
        assert record.version == VERSION
        base = ws.base_manifest(BASE)
        alpha = manifest.task("alpha")
        return {
            "superposition-shard": manifest.superposition[0].key,
            "serving-shard": manifest.serving.shards[0].key,  # type: ignore[union-attr]
            "private-shard": alpha.private[0].key,
            "side-file": alpha.files["config.json"].key,
            "version-manifest": record.manifest_key,
            "base-shard": base.shards[0].key,
            "base-manifest": manifest.base.manifest_key,
        }


@pytest.fixture(scope="module", params=["local", "s3"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> World:
    kind = request.param
    root = tmp_path_factory.mktemp(f"integrity-{kind}")
    if kind == "local":
        store_dir = root / "store"
        env = _build(kind, root, store_dir.as_uri(), {})

        def flip(key: str) -> bytes:
            path = store_dir / key
            original = path.read_bytes()
            with path.open("r+b") as handle:  # in place, as bit rot would
                handle.write(_flipped(original))
            return original

        def put(key: str, data: bytes) -> None:
            (store_dir / key).write_bytes(data)

    else:
        server = request.getfixturevalue("s3_server")
        if not server.running:
            server.start()
        bucket = server.new_bucket("integrity")
        extra = {"RANDES_S3_ENDPOINT_URL": server.endpoint_url}
        env = _build(kind, root, f"s3://{bucket}/randes", extra)
        client = server.client()

        def flip(key: str) -> bytes:
            original: bytes = client.get_object(Bucket=bucket, Key=f"randes/{key}")["Body"].read()
            client.put_object(Bucket=bucket, Key=f"randes/{key}", Body=_flipped(original))
            return original

        def put(key: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"randes/{key}", Body=data)

    probe = Settings(
        home=Path(env["RANDES_HOME"]),
        store_url=env["RANDES_STORE_URL"],
        s3_endpoint_url=env.get("RANDES_S3_ENDPOINT_URL"),
        cache_dir=root / "setup-cache",
    )
    return World(kind, root, env, _keys(probe), flip, put)


@pytest.fixture
def use_env(world: World, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Point the environment (what the CLI reads) at the world, with a given cache dir."""
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)

    def with_cache(cache: Path) -> None:
        monkeypatch.setenv("RANDES_CACHE_DIR", str(cache))

    return with_cache


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _error_line(code: int, out: str, err: str) -> str:
    assert code == 1, (code, out, err)
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _names_the_damage(message: str, key: str, target: str) -> None:
    assert key in message, (key, message)
    owners = [f"bundle {BUNDLE} version {VERSION}"]
    if target.startswith("base"):
        owners.append(f"base {BASE}")
    assert any(owner in message for owner in owners), (owners, message)


def _nothing_at(dest: Path) -> None:
    assert not dest.exists(), sorted(dest.rglob("*"))
    leftovers = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
    assert leftovers == [], leftovers


TARGETS = [
    "superposition-shard",
    "serving-shard",
    "private-shard",
    "side-file",
    "version-manifest",
    "base-shard",
    "base-manifest",
]


# ------------------------------------------------------- damage in the store
@pytest.mark.parametrize("target", TARGETS)
def test_damaged_store_object_is_reported_by_pull_materialize_and_validate(
    world: World, use_env: Callable[[Path], None], tmp_path: Path, target: str
) -> None:
    master = target == "superposition-shard"  # read by the --master path only
    flag = ["--master"] if master else []
    with world.damaged(target) as key:
        use_env(tmp_path / "cache-pull")
        dest = tmp_path / "pulled"
        line = _error_line(*cli("pull", BUNDLE, str(dest), *flag))
        _names_the_damage(line, key, target)
        _nothing_at(dest)

        use_env(tmp_path / "cache-materialize")
        dest = tmp_path / "model"
        line = _error_line(*cli("materialize", BUNDLE, "alpha", str(dest), *flag))
        _names_the_damage(line, key, target)
        _nothing_at(dest)

        settings = world.settings(tmp_path / "cache-validate")
        with Workspace(settings) as ws, pytest.raises(IntegrityError) as info:
            validate_task(ws, BUNDLE, VERSION, "alpha", master=master)
        _names_the_damage(str(info.value), key, target)

    # undamaged again: everything works, so the failures above were the damage
    use_env(tmp_path / "cache-after")
    assert cli("pull", BUNDLE, str(tmp_path / "pulled"), *flag)[0] == 0
    assert cli("materialize", BUNDLE, "alpha", str(tmp_path / "model"), *flag)[0] == 0


@pytest.mark.parametrize("world", ["local"], indirect=True)  # one backend covers the wrapping
def test_validate_command_reports_a_damaged_shard_in_one_line(
    world: World, use_env: Callable[[Path], None], tmp_path: Path
) -> None:
    """The flow behind ``randes validate`` keeps the command line contract: no Prefect
    log (nor its traceback of the failed task) around the one error line."""
    use_env(tmp_path / "cache")
    with world.damaged("serving-shard") as key:  # what validation measures by default
        line = _error_line(*cli("validate", BUNDLE))
    _names_the_damage(line, key, "serving-shard")


# ------------------------------------------------- what the cache may hide
def _materialized(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir())}


def test_pull_reads_the_store_even_with_a_warm_cache(
    world: World, use_env: Callable[[Path], None], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    use_env(cache)
    assert cli("materialize", BUNDLE, "alpha", str(tmp_path / "warm"))[0] == 0
    good = _materialized(tmp_path / "warm")
    with world.damaged("serving-shard") as key:
        # pull: the store is what it copies, so the damage is reported
        line = _error_line(*cli("pull", BUNDLE, str(tmp_path / "pulled")))
        _names_the_damage(line, key, "serving-shard")
        _nothing_at(tmp_path / "pulled")
        # materialize: served from the verified cached copies, the correct model
        code, out, err = cli("materialize", BUNDLE, "alpha", str(tmp_path / "again"))
        assert code == 0 and err == "", (out, err)
        assert _materialized(tmp_path / "again") == good


def test_damaged_cached_copy_is_fetched_again(
    world: World,
    use_env: Callable[[Path], None],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    use_env(cache)
    assert cli("materialize", BUNDLE, "alpha", str(tmp_path / "first"))[0] == 0
    good = _materialized(tmp_path / "first")
    key = world.keys["serving-shard"]  # what a default materialize reads
    cached = next((cache / "objects").glob(f"{key.rsplit('/', 1)[1]}*"))
    cached.write_bytes(_flipped(cached.read_bytes()))

    with caplog.at_level(logging.WARNING, logger="storage.cache"):
        code, out, err = cli("materialize", BUNDLE, "alpha", str(tmp_path / "second"))
    assert code == 0 and err == "", (out, err)
    assert _materialized(tmp_path / "second") == good
    assert any(key in r.getMessage() for r in caplog.records), caplog.text
    # the cache holds a good copy again
    with Workspace(world.settings(cache)) as ws:
        _, manifest = ws.resolve(BUNDLE)
        sha = manifest.serving.shards[0].sha256  # type: ignore[union-attr]
    assert file_sha256(cached) == sha

    # and validation, through the same cache, heals the same way
    cached.write_bytes(_flipped(cached.read_bytes()))
    with Workspace(world.settings(cache)) as ws:
        result = validate_task(ws, BUNDLE, VERSION, "alpha")
    assert result.delta_cosine is not None and result.delta_cosine > 0.5


def test_damaged_cache_and_store_report_the_store_object(
    world: World, use_env: Callable[[Path], None], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    use_env(cache)
    assert cli("materialize", BUNDLE, "alpha", str(tmp_path / "first"))[0] == 0
    key = world.keys["private-shard"]
    cached = next((cache / "objects").glob(f"{key.rsplit('/', 1)[1]}*"))
    cached.write_bytes(_flipped(cached.read_bytes()))
    with world.damaged("private-shard"):
        dest = tmp_path / "second"
        line = _error_line(*cli("materialize", BUNDLE, "alpha", str(dest)))
        _names_the_damage(line, key, "private-shard")
        assert "does not match its sha256" in line
        _nothing_at(dest)

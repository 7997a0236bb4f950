"""A full disk under the local store, the cache (work directories) or a pull
destination: one clear error line, nothing partial visible, the retry completes.

The disk is a small tmpfs mounted by the test (``mount -t tmpfs -o size=...``; it needs
root or CAP_SYS_ADMIN, and the tmpfs tests skip, saying so, where mounting is not
permitted). The filesystem is filled for real: after setting up version 1 on it, it is
shrunk (``remount,size=``) to what it holds plus a megabyte and a half, so the next fold
runs out of space partway through. Freeing space means growing it again.

A file-size limit (``RLIMIT_FSIZE`` set in the fold's process, EFBIG instead of
ENOSPC) exercises the same path with no mount at all, so it runs everywhere.

After each failure: exit status 1 and a single ``error: no space left on device ...``
line (no traceback); the head is unchanged and every version verifies; no temp file is
left in the store or the cache, no work directory, no half-pulled destination; the
retry, once space is back, completes; `gc` then reclaims what the failed run uploaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.workspace import Workspace
from tests.reliability.conftest import (
    BUNDLE,
    Models,
    Trials,
    assert_one_error_line,
    check_visible,
    child_env,
    fold_argv,
    make_settings,
    run_cli,
    setup_bundle,
    stored_keys,
    tmp_files,
    warm_forkserver,
)

pytestmark = pytest.mark.usefixtures("no_randes_env")

MiB = 1024 * 1024
HEADROOM = MiB + MiB // 2  # room for about one and a half 1 MiB shards


class Tmpfs:
    """A tmpfs mounted at ``path``; resizable, unmounted by the fixture."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mounted = False

    def _mount(self, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def mount(self, size: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = self._mount(f"size={size}", "mode=0755")
        if done.returncode != 0:
            pytest.skip(
                "mounting a tmpfs is not permitted here (needs root or CAP_SYS_ADMIN): "
                f"{done.stderr.strip()}; the RLIMIT_FSIZE test covers the same path"
            )
        self.mounted = True

    def resize(self, size: int) -> None:
        done = self._mount("remount", f"size={size}")
        assert done.returncode == 0, done.stderr

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill_up(self) -> None:
        """Shrink to what it holds plus HEADROOM: the next big write runs out of space."""
        self.resize(self.used() + HEADROOM)

    def unmount(self) -> None:
        if self.mounted:
            done = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=30)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)
            self.mounted = False


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    fs = Tmpfs(tmp_path / "mnt")
    try:
        fs.mount(64 * MiB)
        yield fs
    finally:
        fs.unmount()


@pytest.fixture(scope="module", autouse=True)
def _warm() -> None:
    warm_forkserver()


def _sha_ok(root: Path) -> int:
    """Every object file under ``root`` hashes to its name; returns how many."""
    count = 0
    for path in (root / "objects").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
            count += 1
    return count


# ------------------------------------------------------------------- the store
def test_full_store_fold_fails_cleanly_and_the_retry_completes(
    models: Models, tmpfs: Tmpfs, tmp_path: Path, trials: Trials
) -> None:
    settings = make_settings(tmp_path / "home", store_url=(tmpfs.path / "store").as_uri())
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        before = stored_keys(ws)
    tmpfs.fill_up()

    child = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    line = assert_one_error_line(child, "no space left on device", "object 'objects/")
    assert settings.resolved_store_url in line
    assert tmpfs.free() < MiB, "the store's filesystem was not full"

    with Workspace(settings) as ws:
        assert ws.registry.head(BUNDLE).version == 1  # type: ignore[union-attr]
        assert tmp_files(tmpfs.path) == [], "the store left its temp file behind"
        orphans = stored_keys(ws) - before
        assert orphans, "nothing was uploaded before the disk filled up"
        assert ws.registry.leased_keys() == set()  # the failed fold released its leases
        check_visible(ws, models, tmp_path / "scratch", set())

    tmpfs.resize(64 * MiB)  # space is back
    retry = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    assert retry.proc.exitcode == 0 and retry.stderr == "", retry.output()
    assert "version 2 adds task 't1'" in retry.stdout
    with Workspace(settings) as ws:
        report = ws.gc(grace_s=0)
        assert set(report.deleted) == orphans - ws.registry.referenced_keys()
        assert stored_keys(ws) == ws.registry.referenced_keys()
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with Workspace(fresh) as ws:
        assert check_visible(ws, models, tmp_path / "scratch", set()) == [1, 2]
    print(f"\nfull store: {line}")
    trials.record("disk full: local store (tmpfs)", "fold uploads")


# ------------------------------------------------------- the cache / work dirs
@pytest.mark.parametrize("where", ["cache-download", "work-dir"])
def test_full_cache_fold_fails_cleanly_and_the_retry_completes(
    where: str, models: Models, tmpfs: Tmpfs, tmp_path: Path, trials: Trials
) -> None:
    """``cache-download``: the parent superposition does not fit into the cache;
    ``work-dir``: it is cached already, and the fold's own shards do not fit."""
    settings = make_settings(tmp_path / "home", cache_dir=tmpfs.path / "cache")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        if where == "work-dir":
            record, manifest = ws.resolve(BUNDLE)
            for ref in manifest.superposition:
                ws.cache.fetch(ref)
        before = stored_keys(ws)
    tmpfs.fill_up()

    child = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    line = assert_one_error_line(child, "no space left on device")
    with Workspace(settings) as ws:
        assert ws.registry.head(BUNDLE).version == 1  # type: ignore[union-attr]
        assert stored_keys(ws) == before  # it failed before uploading anything
        assert ws.registry.leased_keys() == set()
        assert tmp_files(tmpfs.path) == []
        assert not any(ws.work_root.iterdir()), list(ws.work_root.iterdir())

    tmpfs.resize(64 * MiB)
    retry = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    assert retry.proc.exitcode == 0 and retry.stderr == "", retry.output()
    with Workspace(settings) as ws:
        assert check_visible(ws, models, tmp_path / "scratch", set()) == [1, 2]
        assert ws.gc(grace_s=0).deleted == []
    print(f"\nfull cache ({where}): {line}")
    trials.record("disk full: cache / work directory (tmpfs)", where)


# --------------------------------------------------------- pull destination
@pytest.mark.parametrize("dest_state", ["absent", "empty-dir"])
def test_full_destination_pull_fails_cleanly_and_the_retry_completes(
    dest_state: str, models: Models, tmpfs: Tmpfs, tmp_path: Path, trials: Trials
) -> None:
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0", "t1")
    dest = tmpfs.path / "pulled"
    if dest_state == "empty-dir":
        dest.mkdir()
    tmpfs.resize(tmpfs.used() + 4 * MiB)  # the pull needs about 15 MiB

    child = run_cli(child_env(settings), ["pull", f"{BUNDLE}@2", str(dest)], tmp_path / "logs")
    line = assert_one_error_line(child, "no space left on device")
    if dest_state == "absent":
        assert not dest.exists()
    else:
        assert dest.is_dir() and not any(dest.iterdir())
    assert sorted(p.name for p in tmpfs.path.iterdir()) == (
        ["pulled"] if dest_state == "empty-dir" else []
    ), "a half-pulled staging directory was left behind"

    tmpfs.resize(64 * MiB)
    retry = run_cli(child_env(settings), ["pull", f"{BUNDLE}@2", str(dest)], tmp_path / "logs")
    assert retry.proc.exitcode == 0 and retry.stderr == "", retry.output()
    assert _sha_ok(dest) > 0
    print(f"\nfull destination ({dest_state}): {line}")
    trials.record("disk full: pull destination (tmpfs)", dest_state)


# ------------------------------------------------------ file-size limit (no mount)
def test_file_size_limit_fold_fails_cleanly_and_the_retry_completes(
    models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
        before = stored_keys(ws)
    child = run_cli(
        child_env(settings),
        fold_argv(models, "t1"),
        tmp_path / "logs",
        point=f"rlimit-fsize={512 * 1024}",
    )
    line = assert_one_error_line(child, "file too large")
    with Workspace(settings) as ws:
        assert ws.registry.head(BUNDLE).version == 1  # type: ignore[union-attr]
        assert stored_keys(ws) == before
        assert tmp_files(tmp_path / "home") == []
        assert not any(ws.work_root.iterdir())
    retry = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    assert retry.proc.exitcode == 0, retry.output()
    with Workspace(settings) as ws:
        assert check_visible(ws, models, tmp_path / "scratch", set()) == [1, 2]
    print(f"\nRLIMIT_FSIZE: {line}")
    trials.record("disk full: file-size limit (RLIMIT_FSIZE)", "fold")

"""storage.scratch: a killed runtime's scratch is removed by the next one, a live one's never.

The processes are real: a child makes its scratch (the sign streams a runtime keeps,
`storage.sign_files.SignFiles`) and is killed with SIGKILL, so nothing of its own
clean-up runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import storage.scratch as scratch
from storage.scratch import ScratchDir, sweep
from storage.sign_files import SignFiles

CHILD = """
import sys, time
from pathlib import Path
import numpy as np
from storage.sign_files import SignFiles
signs = SignFiles(1 << 20, parent=Path(sys.argv[1]))
signs.task(0).keep("w", np.ones(4096, dtype=np.uint8))
print(signs._dir, flush=True)
time.sleep(600)
"""


def _child(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    path = Path(proc.stdout.readline().strip())
    assert (path / "0.bits").stat().st_size == 4096
    return proc, path


@pytest.fixture
def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scratch, "GRACE_S", 0.0)


def test_a_killed_runtime_s_signs_are_removed_by_the_next_one(tmp_path: Path, no_grace) -> None:  # type: ignore[no-untyped-def]
    proc, left = _child(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir()  # nothing of the child's clean-up ran
    signs = SignFiles(1 << 20, parent=tmp_path)
    try:
        assert not left.exists()
        assert signs._scratch.swept == 1
        assert [p.name for p in tmp_path.iterdir()] == [signs._dir.name]
    finally:
        signs.close()
    assert list(tmp_path.iterdir()) == []


def test_a_live_runtime_s_signs_are_left_alone(tmp_path: Path, no_grace) -> None:  # type: ignore[no-untyped-def]
    proc, live = _child(tmp_path)
    try:
        assert sweep("signs", tmp_path) == 0
        assert (live / "0.bits").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sweep("signs", tmp_path) == 1 and not live.exists()


def test_what_is_not_an_abandoned_scratch_stays(tmp_path: Path) -> None:
    """No lock file (another tool's, an older release's), a lock file younger than the
    grace period (its process may not have locked it yet), another kind."""
    unlocked = tmp_path / ".randes-signs-old"
    unlocked.mkdir()
    young = tmp_path / ".randes-signs-young"
    young.mkdir()
    (young / scratch.LOCK).touch()
    other = tmp_path / ".randes-runtime-x"
    other.mkdir()
    (other / scratch.LOCK).touch()
    os.utime(other / scratch.LOCK, (time.time() - 3600, time.time() - 3600))
    assert sweep("signs", tmp_path) == 0
    assert unlocked.is_dir() and young.is_dir() and other.is_dir()
    assert sweep("runtime", tmp_path) == 1 and not other.exists()


def test_a_scratch_dir_is_private_and_locked_while_it_lives(tmp_path: Path, no_grace) -> None:  # type: ignore[no-untyped-def]
    made = ScratchDir("signs", tmp_path)
    try:
        assert made.path.stat().st_mode & 0o777 == 0o700
        assert sweep("signs", tmp_path) == 0  # this process holds its lock
        np.zeros(1).tofile(made.path / "x")
    finally:
        made.remove()
    assert not made.path.exists()

"""A killed runtime's scratch is removed by the next one, a live one's never
(storage.workdirs, the work directories folds use too).

The processes are real: a child makes its scratch (the sign streams a runtime keeps,
`storage.sign_files.SignFiles`) and is killed with SIGKILL, so nothing of its own
clean-up runs.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from storage.sign_files import SignFiles
from storage.workdirs import scratch_root, sweep_work_dirs, work_dir

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


def test_a_killed_runtime_s_signs_are_removed_by_the_next_one(tmp_path: Path) -> None:
    proc, left = _child(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.is_dir()  # nothing of the child's clean-up ran
    signs = SignFiles(1 << 20, parent=tmp_path)
    try:
        assert not left.exists()
        assert {p.name for p in tmp_path.iterdir()} == {signs._dir.name, f"{signs._dir.name}.lock"}
    finally:
        signs.close()
    assert list(tmp_path.iterdir()) == []


def test_a_live_runtime_s_signs_are_left_alone(tmp_path: Path) -> None:
    proc, live = _child(tmp_path)
    try:
        sweep_work_dirs(tmp_path)
        assert (live / "0.bits").is_file()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sweep_work_dirs(tmp_path)
    assert not live.exists()


def test_the_scratch_root_is_private_to_this_user() -> None:
    root = scratch_root()
    assert root.stat().st_mode & 0o777 == 0o700
    with work_dir(root) as made:
        np.zeros(1).tofile(made / "x")
    assert not made.exists()

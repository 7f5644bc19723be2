"""fsutil's temporaries: marked with their writer, and swept once that writer is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blackwheel.core import procs
from blackwheel.core.fsutil import _temp_beside, sweep_temporaries, temp_dir_beside, temp_prefix

SRC = str(Path(__file__).resolve().parents[2] / "src")

# a writer killed before it could clean up: a .part file and a temporary folder, then SIGKILL
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from blackwheel.core.fsutil import _temp_beside, temp_dir_beside
folder = Path(sys.argv[1])
fd, tmp = _temp_beside(folder / "pkg-1.0-py3-none-any.whl")
os.write(fd, b"half a wheel")
(temp_dir_beside(folder / "index") / "half").write_text("x")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_what_a_killed_writer_left_is_swept_and_nothing_else(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith(".") for name in left)
    fd, mine = _temp_beside(tmp_path / "other.whl")          # a live writer's: its first act swept the two
    os.close(fd)
    (tmp_path / ".unmarked.part").write_text("not ours to judge")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(mine).name, ".unmarked.part"])
    assert sweep_temporaries(tmp_path) == []                  # ours stays while we run


def test_a_reused_pid_does_not_keep_an_orphan(tmp_path):
    pid, start = procs.me()
    stale = tmp_path / f".x.whl.bw{pid}_{start + 1}.abc.part"  # this pid, another start: not this process
    stale.write_text("old")
    live = tmp_path / f"{temp_prefix('x.whl')}def.part"
    live.write_text("new")
    assert sweep_temporaries(tmp_path) == [stale.name] and live.exists()
    folder = temp_dir_beside(tmp_path / "tree", ".part")
    assert folder.name.startswith(temp_prefix("tree")) and folder.name.endswith(".part")
    assert sweep_temporaries(tmp_path / "missing") == []

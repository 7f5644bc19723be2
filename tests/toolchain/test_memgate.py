"""memgate: waits while memory is short, then runs the compiler; bounded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from blackwheel.toolchain import memgate
from blackwheel.toolchain.memgate import available_memory_bytes, cgroup_headroom, meminfo_available, wait_for_memory

GIB = 1 << 30


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def test_waits_until_memory_frees_up():
    readings = iter([1 * GIB, 1 * GIB, 1 * GIB, 5 * GIB])
    clock = FakeClock()
    waited = wait_for_memory(4 * GIB, 600, lambda: next(readings), clock.sleep, clock)
    assert len(clock.sleeps) == 3
    assert clock.sleeps[2] > clock.sleeps[0]  # backoff grows
    assert waited == pytest.approx(sum(clock.sleeps))


def test_gives_up_at_the_bound():
    clock = FakeClock()
    waited = wait_for_memory(4 * GIB, 60, lambda: 0, clock.sleep, clock)
    assert waited == pytest.approx(60)
    assert max(clock.sleeps) <= memgate.MAX_SLEEP_S * 1.25


def test_no_wait_when_memory_is_there():
    clock = FakeClock()
    assert wait_for_memory(GIB, 60, lambda: 2 * GIB, clock.sleep, clock) == 0
    assert clock.sleeps == []


def test_meminfo_and_cgroup_v1(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemFree: 5 kB\nMemAvailable: 2048 kB\n")
    assert meminfo_available(meminfo) == 2048 * 1024
    v1 = tmp_path / "cg" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("1048576\n")
    (v1 / "memory.usage_in_bytes").write_text("524288\n")
    (v1 / "memory.stat").write_text("total_inactive_file 0\n")
    assert cgroup_headroom(tmp_path / "cg") == 524288
    assert available_memory_bytes(meminfo, tmp_path / "cg") == 524288
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert cgroup_headroom(tmp_path / "cg") is None


def test_launcher_runs_the_command_after_the_gate(tmp_path):
    """The real launcher process: an impossible threshold with a 1 s bound, then the command runs."""
    out = tmp_path / "ran"
    env = dict(os.environ, **{memgate.MIN_BYTES_ENV: str(1 << 60), memgate.MAX_WAIT_ENV: "1"})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, memgate.__file__, "--", "touch", str(out)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert time.monotonic() - start >= 1.0
    assert "starting touch anyway" in proc.stderr


def test_launcher_passes_exit_code_and_reports_missing_compiler(tmp_path):
    env = dict(os.environ, **{memgate.MIN_BYTES_ENV: "0"})
    false = subprocess.run([sys.executable, memgate.__file__, "--", "false"], env=env)
    assert false.returncode == 1
    missing = subprocess.run([sys.executable, memgate.__file__, "--", str(tmp_path / "nope")],
                             env=env, capture_output=True, text=True)
    assert missing.returncode == 127 and "cannot run" in missing.stderr

"""Interrupts end everything: SIGINT or SIGTERM to blackwheel ends every process its build started.

A build's processes are spread out: pip's session, ninja's jobs in process groups of their own,
and the compilers the sccache server (a daemon outside the build) runs. The tests build such a
tree for real, signal the blackwheel process, and look for any of it left, by pid in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from blackwheel.toolchain import interrupt
from blackwheel.core.errors import Interrupted
from blackwheel.toolchain.progress import run_logged
from tests import cuda_ext
from tests.conftest import needs_nvcc_and_torch, wait_until

SRC = str(Path(interrupt.__file__).resolve().parents[2])   # src/
ENDED_WITHIN_S = 10   # the bound, from the signal to the last compiler gone
COMPILERS = {"cudafe++", "cicc", "ptxas", "cc1plus"}   # the stages of an nvcc compile that take the time



def _running(pids) -> list[int]:
    """The pids that still run something (a zombie has ended; its parent just has not reaped it)."""
    return [pid for pid in pids if interrupt._stat(pid) is not None]


def _pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


# ---- the process helpers -----------------------------------------------------------------------
def test_end_processes_ends_a_tree_whose_middle_dies_first_and_kills_what_ignores_sigterm(tmp_path):
    pids = tmp_path / "pids"
    # the middle shell dies on SIGTERM at once, re-parenting its children; one child ignores SIGTERM
    script = (f"sleep 300 & echo $! >> {pids}; "
              f"{sys.executable} -c 'import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open(\"{pids}\", \"a\").write(f\"{{os.getpid()}} \"); time.sleep(300)' & wait")
    top = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        assert wait_until(10, lambda: len(_pids(pids)) == 2)
        tree = _pids(pids) + [top.pid]
        start = time.monotonic()
        left = interrupt.end_processes(lambda: interrupt.session_tree(top.pid), grace=0.5, kill_wait=2)
        took = time.monotonic() - start
        top.wait(timeout=5)
        assert left == [] and _running(tree) == []
        assert 0.5 <= took < 3            # the stubborn one waited out the grace, then got SIGKILL
    finally:
        for pid in _running(_pids(pids)):
            os.kill(pid, signal.SIGKILL)


def test_session_tree_finds_jobs_in_their_own_group_and_one_that_left_the_session(tmp_path):
    pids = tmp_path / "pids"
    # ninja runs each job in a process group of its own; setsid leaves the session (still below it)
    script = (f"{sys.executable} -c 'import os, time; os.setpgid(0, 0); time.sleep(300)' & echo $! >> {pids}; "
              f"setsid sleep 300 & echo $! >> {pids}; wait")
    top = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        assert wait_until(10, lambda: len(_pids(pids)) == 2)
        assert set(_pids(pids)) | {top.pid} <= interrupt.session_tree(top.pid)
        assert os.getpid() not in interrupt.session_tree(top.pid)
    finally:
        interrupt.end_processes(lambda: interrupt.session_tree(top.pid))
        top.wait(timeout=5)
    assert _running(_pids(pids)) == []


def _fake_proc(root: Path, pid: int, start: int | None, owner: str | None) -> None:
    """A /proc entry: ``stat`` (running, started at ``start``; none: gone) and ``environ``."""
    entry = root / str(pid)
    entry.mkdir(parents=True)
    if start is not None:
        entry.joinpath("stat").write_text(f"{pid} (x) S 1 {pid} {pid} " + "0 " * 15 + f"{start} 0\n")
    marks = [b"PATH=/bin"] + ([f"{interrupt.OWNER_ENV}={owner}".encode()] if owner else [])
    entry.joinpath("environ").write_bytes(b"\0".join(marks) + b"\0")


def test_orphans_are_marked_by_a_blackwheel_that_is_gone(tmp_path):
    _fake_proc(tmp_path, 100, 5, None)          # a blackwheel, running
    _fake_proc(tmp_path, 200, 9, "100:5")       # its build: not an orphan
    _fake_proc(tmp_path, 300, 9, "100:4")       # marked by an earlier process with pid 100: gone
    _fake_proc(tmp_path, 400, 9, "999:1")       # its blackwheel is gone
    _fake_proc(tmp_path, 500, 9, None)          # not a build's
    assert interrupt.orphans(tmp_path) == {300, 400}


def test_end_orphans_ends_what_a_killed_blackwheel_left_and_nothing_else():
    """A build's processes carry their blackwheel's mark (``OWNER_ENV``); once that blackwheel is
    gone (SIGKILL: it could end nothing), the next build ends them. A live owner's are left alone."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    mark = f"{owner.pid}:{interrupt._stat(owner.pid).start}"
    mine = subprocess.Popen(["sleep", "300"], env={**os.environ, interrupt.OWNER_ENV: interrupt.owner_mark()})
    left = subprocess.Popen(["sleep", "300"], env={**os.environ, interrupt.OWNER_ENV: mark}, start_new_session=True)
    try:
        assert left.pid not in interrupt.orphans()        # its blackwheel still runs
        owner.kill()
        owner.wait()
        interrupt.end_orphans()      # (another build on this machine may end it first: the same)
        assert left.wait(timeout=10) == -signal.SIGTERM and mine.poll() is None
    finally:
        for proc in (owner, mine, left):
            proc.kill()
            proc.wait()


def test_signals_raise_in_the_main_thread_and_only_the_first_with_only_first():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.SignalsRaise(only_first=True) as signals:
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler raises here, at once
        assert (info.value.exit_code, str(info.value)) == (143, "interrupted by SIGTERM")
        os.kill(os.getpid(), signal.SIGINT)   # a second one: ignored, the cleanup goes on
        time.sleep(0.1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_held_off_raises_when_the_hold_ends():
    with interrupt.SignalsRaise() as signals:
        with pytest.raises(Interrupted) as info:
            with signals.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                reached = True   # not cut short
        assert reached and info.value.exit_code == 130


def test_run_logged_in_a_thread_leaves_signals_to_the_main_thread(tmp_path):
    """bench_build runs builds in threads: handlers cannot be set there, and are not."""
    results = []
    before = signal.getsignal(signal.SIGTERM)

    def build():
        results.append(run_logged(["sh", "-c", "echo '[1/1] cc -c a.c'"], tmp_path, {"PATH": os.environ["PATH"]},
                                  tmp_path / "t.log", "pkg", live=False))

    t = threading.Thread(target=build)
    t.start()
    t.join(timeout=30)
    assert [r.returncode for r in results] == [0]
    assert signal.getsignal(signal.SIGTERM) is before


# ---- a blackwheel process signalled while its build runs ---------------------------------------
# Stands in for pip -> ninja -> nvcc: a job in a process group of its own (as ninja runs them),
# a compiler below it, one that left the session, and one that ignores SIGTERM.
BUILD = """
{py} -c 'import os, subprocess, time; os.setpgid(0, 0); p = subprocess.Popen(["sleep", "300"]);
open("{pids}", "a").write(f"{{os.getpid()}} {{p.pid}} "); time.sleep(300)' &
setsid sleep 300 & echo $! >> {pids}
{py} -c 'import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);
open("{pids}", "a").write(f"{{os.getpid()}} "); time.sleep(300)' &
echo $$ >> {pids}
wait
"""

DRIVER = """
import argparse, os, sys
from pathlib import Path
from blackwheel import cli
from blackwheel.toolchain.progress import run_logged

def build(args):   # what ``blackwheel build`` does around the package's command
    env = {{"PATH": os.environ["PATH"], "SCCACHE_SERVER_PORT": "{port}"}}
    return run_logged(["sh", "-c", {script!r}], Path({tmp!r}), env, Path({tmp!r}) / "build.log", "pkg",
                      live=False).returncode

def parser(command=None):
    p = argparse.ArgumentParser(prog="blackwheel")
    p.set_defaults(func=build)
    return p

cli.make_parser = parser
sys.exit(cli.main([]))
"""

# A stand-in for the sccache server: a daemon outside the build, known by its port, running compiles.
SERVER = """
import os, subprocess, sys, time
env = {k: v for k, v in os.environ.items() if k != "SCCACHE_START_SERVER"}   # as sccache runs compilers
jobs = [subprocess.Popen(["sh", "-c", "sleep 300 & wait"], env=env) for _ in range(2)]
open(sys.argv[1], "w").write(" ".join(str(j.pid) for j in jobs))
time.sleep(300)
"""


@pytest.fixture
def fake_server(tmp_path):
    """(port, server pid, pids of its jobs): a daemon whose children a build's interrupt must end."""
    from blackwheel.toolchain.ccache import free_port

    port, listed = str(free_port()), tmp_path / "server-jobs"
    env = {**os.environ, "SCCACHE_START_SERVER": "1", "SCCACHE_SERVER_PORT": port}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(listed)], env=env, start_new_session=True)
    assert wait_until(10, lambda: len(_pids(listed)) == 2)
    shells = _pids(listed)
    assert wait_until(10, lambda: len(interrupt.descendants(shells)) == 2)   # each shell's sleep
    jobs = shells + sorted(interrupt.descendants(shells))
    yield port, server, jobs
    for pid in _running(jobs):   # a test that failed leaves them
        os.kill(pid, signal.SIGKILL)
    server.kill()
    server.wait()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_blackwheel_ends_every_process_its_build_started(tmp_path, fake_server, sig, code):
    port, server, server_jobs = fake_server
    pids = tmp_path / "pids"
    script = BUILD.format(py=sys.executable, pids=pids)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(port=port, script=script, tmp=str(tmp_path))],
                              env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(30, lambda: len(_pids(pids)) == 5), "the stand-in build did not start"
        build = _pids(pids)
        assert _running(build + server_jobs) == build + server_jobs
        driver.send_signal(sig)
        signalled = time.monotonic()
        assert wait_until(ENDED_WITHIN_S, lambda: not _running(build + server_jobs)), \
            f"left running: {_running(build + server_jobs)}"
        took = time.monotonic() - signalled
        err = driver.communicate(timeout=ENDED_WITHIN_S)[1]
    finally:
        for pid in _running(_pids(pids) + server_jobs):
            os.kill(pid, signal.SIGKILL)
        driver.kill()
    print(f"\n{signal.Signals(sig).name}: every process ended {took:.1f} s after the signal")
    assert driver.returncode == code
    assert err.splitlines() == [f"blackwheel: interrupted by {signal.Signals(sig).name}; "
                                "nothing half-written was left in the wheelhouse"]
    assert server.poll() is None   # the server itself is stopped by the build (CacheSession.finish)


def test_stop_server_ends_the_compiles_the_server_still_runs(fake_server):
    from blackwheel.toolchain import ccache

    port, server, jobs = fake_server
    ccache.stop_server("/bin/true", {"SCCACHE_SERVER_PORT": port})   # no sccache to ask: signals only
    assert _running(jobs) == [] and _running([server.pid]) == []


# ---- a real build: blackwheel -> pip -> ninja -> sccache -> nvcc ---------------------------------
@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
def test_sigterm_to_a_real_build_leaves_no_compiler_running(bw_env):
    proj = cuda_ext.make_project(bw_env / "proj", sys.executable)
    token = uuid.uuid4().hex   # in the environment of everything the build starts, the server's compiles too
    env = {**os.environ, "PYTHONPATH": SRC, "BLACKWHEEL_RECIPES": str(proj.recipes),
           "BLACKWHEEL_PATCHES": str(proj.patches), "BLACKWHEEL_MIRROR": str(proj.mirror),
           "BLACKWHEEL_OFFLINE": "1", "BLACKWHEEL_CACHE_URL": f"file://{bw_env / 'sccache'}",  # cold: it compiles
           "BW_INTERRUPT_TEST": token}
    marker = f"BW_INTERRUPT_TEST={token}".encode()

    def build_processes() -> dict[int, tuple[str, bool]]:   # pid -> (command name, an sccache server?)
        found = {}
        for p in interrupt.process_table():
            try:
                environ = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
                if p.pid != os.getpid() and marker in environ:
                    found[p.pid] = (Path(f"/proc/{p.pid}/comm").read_text().strip(),
                                    b"SCCACHE_START_SERVER=1" in environ)
            except OSError:
                pass
        return found

    def server_compiles() -> set[str]:   # what the case is about: compilers the sccache server runs
        procs = build_processes()
        below = interrupt.descendants([pid for pid, (_, server) in procs.items() if server])
        return {procs[pid][0] for pid in below if pid in procs}

    driver = subprocess.Popen([sys.executable, "-m", "blackwheel.cli", "build", cuda_ext.NAME, "--target",
                               "blackwell", "--stack", "test"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(240, lambda: server_compiles() & COMPILERS), "the sccache server ran no compiler"
        running = sorted(name for name, _ in build_processes().values())
        driver.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ended = wait_until(ENDED_WITHIN_S, lambda: not build_processes())
        took, left = time.monotonic() - signalled, build_processes()
        err = driver.communicate(timeout=30)[1]
    finally:
        for pid in build_processes():
            os.kill(pid, signal.SIGKILL)
        driver.kill()
    assert ended, f"still running {ENDED_WITHIN_S} s after SIGTERM: {left}"
    print(f"\nreal build: SIGTERM while running {' '.join(running)}; every process ended {took:.1f} s after")
    assert driver.returncode == 143
    assert err.splitlines()[-1] == ("blackwheel: interrupted by SIGTERM; "
                                    "nothing half-written was left in the wheelhouse")
    assert "Traceback" not in err
    assert not list((bw_env / "wheelhouse").rglob("*.whl")) and not list((bw_env / "wheelhouse").rglob("*.part"))

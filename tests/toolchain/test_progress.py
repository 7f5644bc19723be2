"""progress.py: the first compiler error of a build log, and run_logged on a small shell command."""

from __future__ import annotations

import os

import pytest

from blackwheel.core.errors import BuildFailed
from blackwheel.toolchain.progress import Progress, first_error, run_logged

NINJA_NVCC = """\
$ cd /src && pip wheel .
[1/3] c++ -MMD -c /src/csrc/api.cpp -o /build/api.o -Werror=return-type
/src/csrc/api.cpp:10:5: warning: unused variable 'x' [-Wunused-variable]
[2/3] /usr/local/cuda/bin/nvcc -c /src/csrc/kernel.cu -o /build/kernel.o
FAILED: /build/kernel.o
/usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c /src/csrc/kernel.cu -o /build/kernel.o
/src/csrc/kernel.cu(12): error: identifier "foo" is undefined
      foo();
      ^

1 error detected in the compilation of "/src/csrc/kernel.cu".
ninja: build stopped: subcommand failed.
error: command '/usr/bin/g++' failed with exit code 1
"""

GCC = """\
In file included from /src/a.cpp:1:
/src/a.h:3:1: warning: 'int old()' is deprecated [-Wdeprecated-declarations]
/src/a.cpp:7:12: error: 'cublasLtMatmul' was not declared in this scope
    7 |     return cublasLtMatmul();
error: command 'g++' failed
"""

FAILED_ONLY = """\
[1/2] c++ -c a.cpp
FAILED: a.o
c++ -c a.cpp -o a.o
Killed
ninja: build stopped: subcommand failed.
"""


@pytest.mark.parametrize("text, expected", [
    (NINJA_NVCC, '/src/csrc/kernel.cu(12): error: identifier "foo" is undefined | foo();'),
    (GCC, "/src/a.cpp:7:12: error: 'cublasLtMatmul' was not declared in this scope | "
          "7 |     return cublasLtMatmul();"),
    (FAILED_ONLY, "FAILED: a.o | c++ -c a.cpp -o a.o"),
    ("x.cu(3): warning #177-D: variable \"e\" was declared but never referenced\n"
     "x.cu(9): error #20: identifier \"e2\" is undefined\n", 'x.cu(9): error #20: identifier "e2" is undefined'),
    ("/src/b.cpp:1:10: fatal error: cublas_v2.h: No such file or directory\ncompilation terminated.\n",
     "/src/b.cpp:1:10: fatal error: cublas_v2.h: No such file or directory | compilation terminated."),
    ("-- Configuring\nCMake Error at CMakeLists.txt:12 (message):\n  CUDA 13 needs sm_75 or newer\n",
     "CMake Error at CMakeLists.txt:12 (message): | CUDA 13 needs sm_75 or newer"),
    ("/src/c.cpp:2:3: error: 'f' is deprecated [-Werror=deprecated-declarations]\n",
     "/src/c.cpp:2:3: error: 'f' is deprecated [-Werror=deprecated-declarations]"),
    ("all good\n[1/1] done\n", None),
])
def test_first_error(tmp_path, text, expected):
    log = tmp_path / "build.log"
    log.write_text(text)
    assert first_error(log) == expected


def test_first_error_long_lines_are_cut(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("a.cpp:1:1: error: " + "x" * 2000 + "\n")
    assert len(first_error(log)) == 600


def test_first_error_of_a_missing_log(tmp_path):
    assert first_error(tmp_path / "none.log") is None


SCRIPT = """
echo "configuring"
for i in 1 2 3; do echo "[$i/3] nvcc -c unit$i.cu"; done
echo "to stderr" >&2
exit "$1"
"""


@pytest.mark.parametrize("rc", [0, 3])
def test_run_logged(tmp_path, rc, capsys):
    log = tmp_path / "logs" / "build.log"
    env = {"PATH": os.environ["PATH"]}
    res = run_logged(["sh", "-c", SCRIPT, "sh", str(rc)], tmp_path, env, log, "pkg", expected_units=5, live=False)
    assert res.returncode == rc
    assert (res.units_done, res.units_total) == (3, 3)          # ninja's own total replaces the estimate
    assert [u.split()[0] for u in res.unit_lines] == ["[1/3]", "[2/3]", "[3/3]"]
    assert res.peak_mem_bytes >= 0 and res.wall_s > 0 and res.log == log
    text = log.read_text()
    assert text.startswith(f"$ cd {tmp_path} && sh -c")
    assert "configuring\n" in text and "[3/3] nvcc -c unit3.cu\n" in text and "to stderr\n" in text
    assert "pkg: 3/3 units" in capsys.readouterr().err
    assert res.first_error is None


def test_run_logged_failure_carries_the_first_error(tmp_path):
    script = 'echo "[1/1] g++ -c a.cpp"; echo "a.cpp:1:1: error: expected \';\'"; echo "  int x"; exit 1'
    res = run_logged(["sh", "-c", script], tmp_path, {"PATH": os.environ["PATH"]}, tmp_path / "b.log", "pkg",
                     live=False)
    assert res.returncode == 1
    assert res.first_error == "a.cpp:1:1: error: expected ';' | int x"


def test_run_logged_kills_the_command_on_interrupt(tmp_path, monkeypatch):
    """Ctrl-C during a build must not leave its process group running."""
    import blackwheel.toolchain.progress as progress

    pidfile = tmp_path / "pid"
    script = f'echo $$ > {pidfile}; echo "[1/2] x"; sleep 30; echo "[2/2] y"'

    def interrupt(self, done, total):
        raise KeyboardInterrupt

    monkeypatch.setattr(progress.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_logged(["sh", "-c", script], tmp_path, {"PATH": os.environ["PATH"]}, tmp_path / "c.log", "pkg",
                   live=False)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_progress_eta():
    p = Progress("x", 10, live=False)
    assert p.eta_text().endswith("elapsed")
    p.start -= 10
    p.done, p.total = 5, 10
    assert "~10s left" in p.eta_text() or "~9s left" in p.eta_text() or "~11s left" in p.eta_text()


def test_run_logged_of_a_missing_program(tmp_path):
    with pytest.raises(BuildFailed, match="pkg: cannot run /no/such/tool: No such file or directory"):
        run_logged(["/no/such/tool"], tmp_path, {"PATH": os.environ["PATH"]}, tmp_path / "d.log", "pkg",
                   live=False)


def test_affinity_rss_counts_the_processes_on_those_cpus_only():
    import os
    import subprocess
    import sys

    from blackwheel.toolchain.progress import affinity_rss

    cpu = min(os.sched_getaffinity(0))
    before = affinity_rss(frozenset({cpu}))
    child = subprocess.Popen([sys.executable, "-c", "import sys,time; b = bytearray(300 << 20); "
                              "print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        assert child.stdout.readline().strip() == "ready"
        assert affinity_rss(frozenset({cpu})) - before >= 300 << 20
        assert affinity_rss(frozenset({-1})) == 0          # a set nothing is pinned to
    finally:
        child.kill()
        child.wait()


def test_memory_sampler_keeps_the_peak_of_its_measure():
    import time

    from blackwheel.toolchain.progress import MemorySampler

    values = iter([5, 40, 7] + [1] * 1000)
    sampler = MemorySampler(interval=0.01, measure=lambda: next(values))
    sampler.start()
    time.sleep(0.2)
    assert sampler.stop() == 40


def test_a_thread_pinned_to_part_of_the_machine_measures_its_own_processes():
    import threading

    from blackwheel.toolchain.progress import pinned_measure

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no part of the machine to pin to")
    assert pinned_measure() is None                       # the whole machine: machine-wide figure
    seen = {}

    def pinned():
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        measure = pinned_measure()
        seen["bytes"] = measure() if measure else None

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert seen["bytes"] is not None and seen["bytes"] >= 0

"""Run a build command with a log file, live progress and a peak-memory sampler.

Progress is read from ninja's ``[done/total]`` lines; the terminal shows compile units done of
total, elapsed time and an estimate. Everything the command prints goes to the log; on failure the
first compiler error is pulled out of it. SIGINT, SIGTERM or an error while it runs ends every
process the command started, the sccache server's compiles included (``end_build``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .ccache import server_jobs
from ..core.errors import BuildFailed
from .interrupt import SignalsRaise, end_processes, session_tree
from .ninja import unit_progress

# a compiler's (gcc, nvcc "error #20-D:", MSVC-style "error C2065") or CMake's own diagnostic
_ERROR = re.compile(r"(\berror( #[\w-]+)?:|\berror [A-Z]+\d+|fatal error|CMake Error|Error compiling)", re.I)
_WARNING = re.compile(r"\bwarning( #[\w-]+)?:", re.I)   # "error" inside a warning is not an error
_FAILED = re.compile(r"^FAILED: ")                          # ninja's line: names the unit, not the error


def _mem_used_bytes() -> int | None:
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return None


def affinity_rss(cpus: frozenset[int]) -> int:
    """Resident bytes of the processes pinned to exactly ``cpus``: one build among others at once.

    A build started from a thread pinned to its own CPUs passes them to every process it starts,
    compilers run by an sccache server included (the server inherits them too).
    """
    import psutil  # optional (the build extra): only a pinned build measures its own processes

    total = 0
    for proc in psutil.process_iter(["cpu_affinity", "memory_info"]):
        affinity, mem = proc.info.get("cpu_affinity"), proc.info.get("memory_info")
        if affinity is not None and mem is not None and frozenset(affinity) == cpus:
            total += mem.rss
    return total


def pinned_measure():
    """``affinity_rss`` of the calling thread's CPUs when they are part of the machine, else None.

    A build started on a share of the CPUs (``taskset``, or a thread pinned by bench_build) is one
    build among others: its peak is its own processes' memory, not the machine's."""
    try:
        import psutil  # noqa: F401  (in the build extra; without it, the machine-wide figure)
        mine = frozenset(os.sched_getaffinity(0))
    except (ImportError, AttributeError):
        return None
    if len(mine) >= (os.cpu_count() or 0):
        return None
    return lambda: affinity_rss(mine)


class MemorySampler(threading.Thread):
    """Peak of (memory in use on the machine) minus what was in use when the build started.

    With ``measure`` (bytes a build uses now, e.g. ``affinity_rss``), the peak of that instead;
    a process pinned to a share of the CPUs measures its own share (``pinned_measure``)."""

    def __init__(self, interval: float = 0.5, measure=None):
        super().__init__(daemon=True)
        self.interval = interval
        measure = measure or pinned_measure()
        self.measure = measure or _mem_used_bytes
        self.baseline = 0 if measure else (_mem_used_bytes() or 0)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            used = self.measure()
            if used is not None:
                self.peak = max(self.peak, used - self.baseline)

    def stop(self) -> int:
        self._halt.set()
        self.join(timeout=2)
        return self.peak


@dataclass
class RunResult:
    returncode: int
    wall_s: float
    peak_mem_bytes: int
    units_done: int
    units_total: int
    log: Path
    first_error: str | None = None
    unit_lines: list[str] = field(default_factory=list)


class Progress:
    """Terminal progress: a rich bar on a TTY, a line every 30 s (or 10% of units) otherwise."""

    def __init__(self, label: str, expected_units: int | None, live: bool | None = None):
        self.label = label
        self.total = expected_units or 0
        self.done = 0
        self.start = time.monotonic()
        self.live = sys.stderr.isatty() if live is None else live
        self._last_print = 0.0
        self._bar = None
        if self.live:
            # rich draws the bar only on a live terminal; a logged build never pays for importing it
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(label, total=self.total or None)
            self._bar.start()

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = time.monotonic()
        step = max(1, total // 10)
        if now - self._last_print >= 30 or done == total or done % step == 0:
            self._last_print = now
            print(f"  {self.label}: {done}/{total} units, {self.eta_text()}", file=sys.stderr, flush=True)

    def eta_text(self) -> str:
        elapsed = time.monotonic() - self.start
        if not self.done or not self.total:
            return f"{elapsed:.0f}s elapsed"
        remaining = elapsed / self.done * (self.total - self.done)
        return f"{elapsed:.0f}s elapsed, ~{remaining:.0f}s left"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def first_error(log: Path) -> str | None:
    """The first compiler error line in the log, with the line after it for context.

    Ninja prints ``FAILED: <unit>`` before the compiler's message: that line is the fallback only.
    """
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for wanted in (lambda ln: _ERROR.search(ln) and not _WARNING.search(ln), _FAILED.match):
        for i, line in enumerate(lines):
            if wanted(line) and not line.startswith("$ cd "):   # run_logged's echo of the command
                nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
                return (line.strip() + (f" | {nxt}" if nxt and len(nxt) < 200 else ""))[:600]
    return None


def end_build(proc: subprocess.Popen, env: Mapping[str, str]) -> list[int]:
    """End a build command started with ``start_new_session``: its session, what is below it,
    and the compiles the build's sccache server runs (found by the port in ``env``).

    All at once, so the server gets no new job from a build still being ended. Returns the
    pids that would not end (none, unless one is stuck in the kernel).
    """
    port = env.get("SCCACHE_SERVER_PORT")
    left = end_processes(lambda: session_tree(proc.pid) | (server_jobs(port) if port else set()))
    with contextlib.suppress(subprocess.TimeoutExpired):   # reaped, unless it is among ``left``
        proc.wait(timeout=1)
    return left


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, label: str) -> subprocess.Popen:
    """The build command in a session of its own: ``end_build`` finds every process it starts."""
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
    except OSError as exc:  # no such program, or cwd gone: the user's problem, in one line
        raise BuildFailed(f"{label}: cannot run {cmd[0]}: {exc.strerror or exc} (log: {log})") from None


def run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, label: str,
               expected_units: int | None = None, live: bool | None = None) -> RunResult:
    """Run ``cmd``, teeing its output to ``log`` and progress to the terminal.

    SIGINT or SIGTERM (in the main thread), or any exception while it runs, ends every process
    the command started (``end_build``) and raises; ``Interrupted`` for a signal.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(label, expected_units, live)
    sampler = MemorySampler()
    sampler.start()
    start = time.monotonic()
    units: list[str] = []
    proc = None
    with open(log, "w", encoding="utf-8") as out, SignalsRaise(only_first=True) as signals:
        out.write(f"$ cd {shlex.quote(str(cwd))} && {shlex.join(cmd)}\n")
        out.flush()
        try:
            with signals.held():   # a signal while it starts ends it too, once it has a pid
                proc = _start(cmd, cwd, env, log, label)
            for line in proc.stdout:
                out.write(line)
                out.flush()   # the log is what a user tails while the build runs
                done_total = unit_progress(line)     # ninja's [12/73], indented by pip
                if done_total:
                    units.append(line)
                    progress.update(*done_total)
            rc = proc.wait()
        except BaseException:
            with signals.held():   # a second Ctrl-C must not cut the ending short
                if proc is not None:
                    end_build(proc, env)
                sampler.stop()
            raise
        finally:
            progress.close()
    wall = time.monotonic() - start
    peak = sampler.stop()
    result = RunResult(rc, wall, peak, progress.done, progress.total, log, unit_lines=units)
    if rc != 0:
        result.first_error = first_error(log)
    return result

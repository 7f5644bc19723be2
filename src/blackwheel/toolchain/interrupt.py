"""Interrupts end everything: SIGINT or SIGTERM to blackwheel ends every process a build started.

A build's processes are not one process group: ninja puts each compile command in a group of
its own, and sccache runs the compilers in its server, a daemon outside the build. So a build's
command runs in a session of its own (``start_new_session``) and is ended by session and by
descent (``session_tree``), together with what runs below the build's sccache server
(``ccache.server_jobs``). SIGTERM first, so ninja and nvcc clean up after themselves; SIGKILL
for what is left after a grace period. Processes are followed by pid and start time, so a
compiler whose parent dies first (and is re-parented) is still ended, and a reused pid never is.

A blackwheel killed outright (SIGKILL, the OOM killer) can end nothing: its build session and its
sccache server run on, the package build in the very work folder a rerun would prepare. So every
process of a build carries its blackwheel's ``OWNER_ENV`` mark, and the next build ends the
``orphans`` (marked by a blackwheel that is gone) before it starts.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..core.errors import Interrupted
from ..core.procs import Proc, me, running as _running, stat as _stat

OWNER_ENV = "BLACKWHEEL_OWNER"   # "<pid>:<start>" of the blackwheel whose build started the process
SIGNALS = (signal.SIGINT, signal.SIGTERM)
TERM_GRACE_S = 5.0   # ninja forwards SIGTERM to its jobs; nvcc removes its temporary files
KILL_WAIT_S = 2.0    # SIGKILL is not refused: only a process stuck in the kernel outlives this
POLL_S = 0.05        # both within the 10 s an interrupt may take


def process_table(proc_dir: Path = Path("/proc")) -> list[Proc]:
    """Every live process of the machine (of this pid namespace)."""
    entries = (e.name for e in proc_dir.iterdir() if e.name.isdigit())
    return [p for p in (_stat(name, proc_dir) for name in entries) if p is not None]


def descendants(roots: Iterable[int], table: list[Proc] | None = None) -> set[int]:
    """Pids below ``roots`` (the roots themselves excluded)."""
    children: dict[int, list[int]] = {}
    for p in process_table() if table is None else table:
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def session_tree(leader: int) -> set[int]:
    """The processes of ``leader``'s session and those below it (one that left the session too)."""
    table = process_table()
    in_session = {p.pid for p in table if p.session == leader}
    return in_session | descendants([leader], table)


def _signal(pid: int, sig: int) -> None:
    if pid == os.getpid():   # never ourselves: the caller is the one cleaning up
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_processes(find: Callable[[], Iterable[int]], grace: float = TERM_GRACE_S,
                  kill_wait: float = KILL_WAIT_S) -> list[int]:
    """SIGTERM what ``find()`` lists, and what it lists later, until nothing is left; SIGKILL after ``grace`` s.

    ``find`` is asked again on every round: a dying ninja or sccache server may start one more
    job. Returns the pids still running at the end: none, unless one is stuck in the kernel.
    """
    tracked: dict[int, int] = {}   # pid -> start time
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        deadline = time.monotonic() + wait
        signalled: set[int] = set()
        while True:
            for pid in set(find()) - tracked.keys():
                found = _stat(pid)
                if found is not None:
                    tracked[pid] = found.start
            tracked = {pid: start for pid, start in tracked.items() if _running(pid, start)}
            if not tracked:
                return []
            if time.monotonic() >= deadline:
                break
            for pid in tracked.keys() - signalled:
                _signal(pid, sig)
                signalled.add(pid)
            time.sleep(POLL_S)
    return sorted(tracked)


def owner_mark() -> str:
    """This process as ``OWNER_ENV`` names it."""
    pid, start = me()
    return f"{pid}:{start}"


def orphans(proc_dir: Path = Path("/proc")) -> set[int]:
    """Processes marked with ``OWNER_ENV`` by a blackwheel that is gone (or is another process now)."""
    found, needle = set(), f"{OWNER_ENV}=".encode()
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            mark = next((v[len(needle):] for v in (entry / "environ").read_bytes().split(b"\0")
                         if v.startswith(needle)), None)
        except OSError:
            continue
        if mark is None or b":" not in mark:
            continue
        pid, start = mark.decode().split(":", 1)
        owner = _stat(pid, proc_dir) if pid.isdigit() else None
        if owner is None or str(owner.start) != start:
            found.add(int(entry.name))
    return found


def end_orphans() -> set[int]:
    """End what killed blackwheels left running (their builds, sccache servers, compiles); returns the pids."""
    found = orphans()
    if found:
        end_processes(orphans)
    return found


class SignalsRaise:
    """Inside, SIGINT and SIGTERM raise ``Interrupted``, so ``finally`` blocks and cleanups run.

    Python's default for SIGTERM ends the process at once, leaving its children running.
    Handlers live in the main thread only: elsewhere (bench_build's runs) this does nothing
    and the signal goes to the main thread. With ``only_first``, a second signal is ignored
    once one has raised; none raises inside ``held()`` (one received there raises when it
    ends): a cleanup that ends a build's processes is not cut short by a second Ctrl-C or a
    supervisor's repeated SIGTERM.
    """

    def __init__(self, only_first: bool = False):
        self.only_first = only_first
        self.raised = False
        self._holding = 0
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SignalsRaise":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():   # None: a handler set outside Python
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.only_first and self.raised:
            return
        if self._holding:
            self._pending = self._pending or signum
            return
        self.raised = True
        raise Interrupted(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """No signal raises inside; the first one received raises on the way out."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding and self._pending is not None and not (self.only_first and self.raised):
            signum, self._pending = self._pending, None
            self.raised = True
            raise Interrupted(signum)

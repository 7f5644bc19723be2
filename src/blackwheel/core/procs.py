"""Processes named for good: a pid with its start time (clock ticks after boot), read from /proc.

A pid alone may be reused; with its start time it names one process. Used to end what a killed
blackwheel left running (``toolchain.interrupt``) and to tell whose temporary files are orphans
(``fsutil.sweep_temporaries``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    start: int   # clock ticks after boot: with the pid, names one process for good


def stat(pid: int | str, proc_dir: Path = Path("/proc")) -> Proc | None:
    """``/proc/<pid>/stat`` parsed; None when the process is gone or a zombie (it runs nothing)."""
    try:
        text = (proc_dir / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces and ")"
    if fields[0] in ("Z", "X"):
        return None
    return Proc(int(pid), int(fields[1]), int(fields[3]), int(fields[19]))


def running(pid: int, start: int) -> bool:
    """Whether the process that started at ``start`` as ``pid`` still runs."""
    found = stat(pid)
    return found is not None and found.start == start


def me() -> tuple[int, int]:
    """(pid, start) of this process."""
    found = stat(os.getpid())
    return os.getpid(), found.start if found else 0

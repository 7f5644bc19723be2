"""One job budget for builds that run at the same time: a GNU make jobserver, fifo form.

``build-all`` compiles flash-attn, FlashInfer and vLLM together. Each package's build ends in ninja
(torch's extension builder, FlashInfer's AOT ninja run, vLLM's CMake), and ninja >= 1.13 joins a
jobserver named in ``MAKEFLAGS`` as a client: every compile takes a token, so all the builds together
never run more compiles than the budget, and each keeps its own longest-first order. A client may
always run one job without a token, so a budget of N jobs for C builds holds N - C tokens.

A ninja given an explicit ``-j`` ignores the jobserver; the packages' builds pass one (``MAX_JOBS``),
so where ``JOBSERVER_ENV`` is set the ninja stand-in (``ninja.shim_main``) and FlashInfer's AOT runner
leave ``-j`` out (``ninja_jobs_args``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

JOBSERVER_ENV = "BLACKWHEEL_JOBSERVER"      # the fifo's path, while a shared budget is in force


@contextlib.contextmanager
def jobserver(jobs: int, clients: int, folder: Path | None = None) -> Iterator[dict[str, str]]:
    """A fifo jobserver for ``clients`` concurrent builds sharing ``jobs``; yields their environment."""
    if jobs < clients:
        jobs = clients                                   # every build still runs one compile at a time
    where = Path(tempfile.mkdtemp(prefix="bw-jobserver-", dir=folder))
    fifo = where / "fifo"
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)        # held open: readers never see end-of-file
    try:
        os.write(fd, b"+" * (jobs - clients))
        yield {"MAKEFLAGS": f"-j{jobs} --jobserver-auth=fifo:{fifo}", JOBSERVER_ENV: str(fifo)}
    finally:
        os.close(fd)
        fifo.unlink(missing_ok=True)
        where.rmdir()


def ninja_jobs_args(jobs: int, env: Mapping[str, str]) -> list[str]:
    """``["-j", N]``, or nothing under a shared jobserver (an explicit -j would leave it)."""
    return [] if env.get(JOBSERVER_ENV) else ["-j", str(jobs)]


def without_jobs_flag(args: list[str]) -> list[str]:
    """ninja arguments less ``-j N`` / ``-jN``.

    >>> without_jobs_flag(["-v", "-j", "8", "-C", "b"]), without_jobs_flag(["-j16", "all"])
    (['-v', '-C', 'b'], ['all'])
    """
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "-j":
            skip = True
        elif not (a.startswith("-j") and a[2:].isdigit()):
            out.append(a)
    return out

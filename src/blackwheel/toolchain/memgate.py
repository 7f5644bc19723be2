"""A memory gate in front of a compiler: wait while memory is short, then exec the compiler.

Usage (as a compiler launcher, e.g. ``PYTORCH_NVCC="python .../memgate.py -- sccache nvcc"``)::

    python -m blackwheel.toolchain.memgate -- nvcc -c a.cu -o a.o

Why: a job count planned at the start of a build can still run out of memory (other work
on the host, units far bigger than the estimate). When ``MemAvailable`` is below
``BLACKWHEEL_MEMGATE_MIN_BYTES`` the launcher sleeps (backoff with jitter, bounded by
``BLACKWHEEL_MEMGATE_MAX_WAIT_S``, default 30 min) instead of starting the compiler, so
parallelism drops by itself rather than the OOM killer ending the build. After the bound
it starts the compiler anyway (and says so on stderr): a slow build beats a hung one.

This module uses only the standard library and no package-relative imports, so it also
runs as a plain script (``python /path/to/memgate.py -- ...``) from any interpreter.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

MIN_BYTES_ENV = "BLACKWHEEL_MEMGATE_MIN_BYTES"
MAX_WAIT_ENV = "BLACKWHEEL_MEMGATE_MAX_WAIT_S"
DEFAULT_MAX_WAIT_S = 30 * 60
FIRST_SLEEP_S = 1.0
MAX_SLEEP_S = 15.0
UNLIMITED = 1 << 62  # cgroup "max" and v1's 9223372036854771712 both mean no limit


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` in bytes (not MemTotal: on some hosts MemTotal grows as memory is used)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{meminfo} has no MemAvailable line")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.lstrip("-").isdigit():
        return None
    return int(text)


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the cgroup may still use (limit - usage + reclaimable file cache), or None if unlimited.

    cgroup v2 (``memory.max``/``memory.current``) first, then v1 (``memory/memory.limit_in_bytes``).
    Usage counts page cache, which the kernel reclaims before the OOM killer fires, so inactive
    file pages are added back.
    """
    layouts = (
        (root / "memory.max", root / "memory.current", root / "memory.stat", "inactive_file"),
        (root / "memory/memory.limit_in_bytes", root / "memory/memory.usage_in_bytes",
         root / "memory/memory.stat", "total_inactive_file"),
    )
    for limit_file, usage_file, stat_file, cache_key in layouts:
        limit = _read_int(limit_file)
        usage = _read_int(usage_file)
        if limit is None or usage is None or limit >= UNLIMITED:
            continue
        return max(0, limit - usage + _stat_value(stat_file, cache_key))
    return None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"),
                           cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """What a new job may use: the smaller of MemAvailable and the cgroup's headroom."""
    available = meminfo_available(meminfo)
    headroom = cgroup_headroom(cgroup_root)
    return available if headroom is None else min(available, headroom)


def wait_for_memory(min_bytes: int, max_wait_s: float,
                    read_available: Callable[[], int] = available_memory_bytes,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> float:
    """Block until ``read_available() >= min_bytes`` or ``max_wait_s`` passed; return seconds waited.

    Sleeps grow 1 s, 1.5 s, ... up to 15 s, each with +-25 % jitter so that compilers waiting
    together do not all start in the same instant when memory frees up.
    """
    start = clock()
    pause = FIRST_SLEEP_S
    while read_available() < min_bytes:
        waited = clock() - start
        if waited >= max_wait_s:
            return waited
        sleep(min(pause * random.uniform(0.75, 1.25), max(0.0, max_wait_s - waited)))
        pause = min(pause * 1.5, MAX_SLEEP_S)
    return clock() - start


def _settings(environ: dict[str, str]) -> tuple[int, float]:
    min_bytes = int(environ.get(MIN_BYTES_ENV, "0") or 0)
    max_wait = float(environ.get(MAX_WAIT_ENV, DEFAULT_MAX_WAIT_S) or DEFAULT_MAX_WAIT_S)
    return min_bytes, max_wait


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("memgate: usage: python -m blackwheel.toolchain.memgate -- COMPILER [ARGS...]", file=sys.stderr)
        return 2
    try:
        min_bytes, max_wait = _settings(dict(os.environ))
    except ValueError:
        print(f"memgate: {MIN_BYTES_ENV} / {MAX_WAIT_ENV} must be numbers", file=sys.stderr)
        return 2
    if min_bytes > 0:
        waited = wait_for_memory(min_bytes, max_wait)
        if waited >= max_wait:
            print(f"memgate: memory still below {min_bytes} bytes after {waited:.0f} s; "
                  f"starting {args[0]} anyway", file=sys.stderr)
    try:
        os.execvp(args[0], args)
    except OSError as exc:
        print(f"memgate: cannot run {args[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())

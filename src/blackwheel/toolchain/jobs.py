"""How many compile jobs to run at once, and with how many nvcc threads, without overcommitting.

The memory model (why these numbers): a flash-attn unit measured ~4.3 GiB peak per nvcc job
(sm_90, MAX_JOBS=16, NVCC_THREADS=1: 68 GiB over 16 jobs). ``nvcc --threads t`` compiles up
to ``t`` of a unit's arches at once inside one job; the front end and host pass are shared,
so a job with ``t`` threads is modelled as ``unit_mem * (1 + 0.5 * (t - 1))``, not
``t * unit_mem``. Threads beyond the number of arches do nothing, so single-arch builds use
``t = 1`` (more jobs is the better way to fill cores).

Rules every plan obeys (property-tested in tests/test_jobs.py):
- ``jobs * job_memory(t) + reserve <= available`` (unless even one job does not fit: then
  one job and the reason says so);
- ``jobs * t <= cores``; at least one job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError
from .memgate import MAX_WAIT_ENV, MIN_BYTES_ENV, available_memory_bytes

GIB = 1 << 30
DEFAULT_RESERVE = 2 * GIB  # the OS, pip, ninja and the linker at the end
THREAD_MEMORY_GROWTH = 0.5  # each extra nvcc thread adds half a unit's memory (see module doc)
STYLES = ("torch-ext", "vllm")


def job_memory(unit_mem_bytes: int, nvcc_threads: int) -> int:
    """Modelled peak bytes of one compile job running ``nvcc_threads`` arch passes at once."""
    return math.ceil(unit_mem_bytes * (1 + THREAD_MEMORY_GROWTH * (nvcc_threads - 1)))


@dataclass(frozen=True)
class JobPlan:
    jobs: int
    nvcc_threads: int
    reason: str

    @property
    def max_jobs_env(self) -> int:
        """MAX_JOBS for torch cpp_extension builds (flash-attn); use env_for('vllm') for vLLM."""
        return self.jobs

    def env_for(self, style: str) -> dict[str, str]:
        """The environment a build of ``style`` needs to get exactly this plan.

        torch-ext: ninja -j MAX_JOBS, each nvcc with --threads NVCC_THREADS.
        vllm: its setup.py divides MAX_JOBS by NVCC_THREADS, so MAX_JOBS = jobs * threads.
        """
        if style == "torch-ext":
            max_jobs = self.jobs
        elif style == "vllm":
            max_jobs = self.jobs * self.nvcc_threads
        else:
            raise UsageError(f"unknown build style {style!r}: expected one of {', '.join(STYLES)}")
        return {"MAX_JOBS": str(max_jobs), "NVCC_THREADS": str(self.nvcc_threads)}


def memgate_env(plan: JobPlan, unit_mem_bytes: int, max_wait_s: int = 30 * 60) -> dict[str, str]:
    """Settings for ``blackwheel.toolchain.memgate`` in front of each compile of ``plan``.

    A unit starts only while one more job's modelled memory is free: the plan's job count is
    the ceiling, the gate lowers it when the host is busier than the plan assumed.
    """
    return {MIN_BYTES_ENV: str(job_memory(unit_mem_bytes, plan.nvcc_threads)),
            MAX_WAIT_ENV: str(max_wait_s)}


def _check(cores: int, available_bytes: int, unit_mem_bytes: int, arch_count: int,
           reserve_bytes: int, nvcc_threads: int | None) -> None:
    if cores < 1:
        raise UsageError(f"cannot plan jobs for {cores} cores: need at least 1")
    if unit_mem_bytes <= 0:
        raise UsageError(f"unit memory must be positive, got {unit_mem_bytes} bytes")
    if arch_count < 1:
        raise UsageError(f"arch count must be at least 1, got {arch_count}")
    if available_bytes < 0 or reserve_bytes < 0:
        raise UsageError("available and reserved memory must not be negative")
    if nvcc_threads is not None and nvcc_threads < 1:
        raise UsageError(f"nvcc threads must be at least 1, got {nvcc_threads}")


def _jobs_for(threads: int, cores: int, usable: int, unit_mem: int) -> tuple[int, int, int]:
    """(jobs, jobs the memory allows, jobs the cores allow) for a thread count."""
    by_memory = usable // job_memory(unit_mem, threads)
    by_cores = cores // threads
    return max(1, min(by_memory, by_cores)), by_memory, by_cores


def _thread_choices(cores: int, arch_count: int, nvcc_threads: int | None) -> range:
    most = max(1, min(arch_count, cores))
    if nvcc_threads is not None:
        pick = min(nvcc_threads, most)
        return range(pick, pick + 1)
    return range(1, most + 1)


def plan_jobs(cores: int, available_bytes: int, unit_mem_bytes: int, arch_count: int = 1,
              reserve_bytes: int = DEFAULT_RESERVE, nvcc_threads: int | None = None) -> JobPlan:
    """Pick (jobs, nvcc threads) that keep the most cores busy within memory.

    With ``nvcc_threads`` given it is only clamped (to the arch count and the cores); without
    it every count from 1 to the arch count is tried and the busiest plan wins, ties going to
    fewer threads (more, smaller jobs schedule better).
    """
    _check(cores, available_bytes, unit_mem_bytes, arch_count, reserve_bytes, nvcc_threads)
    usable = max(0, available_bytes - reserve_bytes)
    best: tuple[int, int, int, int] | None = None  # (busy, threads, by_memory, by_cores)
    for threads in _thread_choices(cores, arch_count, nvcc_threads):
        jobs, by_memory, by_cores = _jobs_for(threads, cores, usable, unit_mem_bytes)
        busy = jobs * threads if by_memory >= 1 else 0  # nothing fits: the smallest job wins
        if best is None or busy > best[0]:
            best = (busy, threads, by_memory, by_cores)
    assert best is not None
    _, threads, by_memory, by_cores = best
    jobs = max(1, min(by_memory, by_cores))
    reason = _reason(jobs, threads, by_memory, by_cores, usable, unit_mem_bytes, available_bytes,
                     reserve_bytes, arch_count, nvcc_threads)
    return JobPlan(jobs=jobs, nvcc_threads=threads, reason=reason)


def _reason(jobs: int, threads: int, by_memory: int, by_cores: int, usable: int, unit_mem: int,
            available: int, reserve: int, arch_count: int, asked_threads: int | None) -> str:
    per_job = job_memory(unit_mem, threads)
    sizes = (f"{per_job / GIB:.1f} GiB per job, {available / GIB:.1f} GiB available, "
             f"{reserve / GIB:.1f} GiB reserved")
    if by_memory < 1:
        text = (f"memory: not even 1 job fits ({sizes}); running 1 job anyway, "
                f"expect swapping or the OOM killer")
    elif by_memory < by_cores:
        text = f"memory: {jobs} jobs x {threads} nvcc threads ({sizes})"
    else:
        text = f"cores: {jobs} jobs x {threads} nvcc threads fill {jobs * threads} cores ({sizes})"
    if asked_threads is not None and asked_threads != threads:
        text += f"; nvcc threads {asked_threads} clamped to {threads} ({arch_count} arch(es))"
    elif arch_count == 1:
        text += "; single arch, so 1 nvcc thread"
    return text


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Cores allowed by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup_root / "cpu/cpu.cfs_quota_us").read_text())
        period_us = int((cgroup_root / "cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota_us / period_us)) if quota_us > 0 and period_us > 0 else None


def machine_resources(cgroup_root: Path = Path("/sys/fs/cgroup"),
                      meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    """(cores this process may use, bytes a new job may use) honouring affinity and cgroups."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, quota)
    return cores, available_memory_bytes(meminfo, cgroup_root)

"""plan_jobs: table tests over host shapes, and the invariant that a plan never overcommits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blackwheel.core.errors import UsageError
from blackwheel.toolchain.jobs import (DEFAULT_RESERVE, GIB, cpu_quota, job_memory, machine_resources, memgate_env,
                             plan_jobs)

UNIT = int(4.3 * GIB)  # flash-attn, measured


@pytest.mark.parametrize(
    "cores, avail_gib, archs, jobs, threads, limit",
    [
        (16, 125, 1, 16, 1, "cores"),   # the measured H100 host: CPU-bound, 16 x 4.3 GiB fits
        (16, 40, 1, 8, 1, "memory"),    # (40 - 2) // 4.3 = 8
        (2, 24, 1, 2, 1, "cores"),      # this CI machine
        (20, 100, 2, 20, 1, "cores"),   # GB10-like, two arches, memory plenty: threads not needed
        (16, 30, 2, 4, 2, "memory"),    # memory-bound: 2 threads per job share a front end
        (64, 8, 1, 1, 1, "memory"),     # 6 GiB usable: one 4.3 GiB job
        (4, 3, 1, 1, 1, "not even"),    # nothing fits: still one job, reason says so
    ],
)
def test_plan_table(cores, avail_gib, archs, jobs, threads, limit):
    plan = plan_jobs(cores, avail_gib * GIB, UNIT, arch_count=archs)
    assert (plan.jobs, plan.nvcc_threads) == (jobs, threads)
    assert limit in plan.reason


def test_single_arch_ignores_requested_threads():
    plan = plan_jobs(16, 125 * GIB, UNIT, arch_count=1, nvcc_threads=4)
    assert plan.nvcc_threads == 1
    assert "clamped to 1" in plan.reason


def test_requested_threads_kept_for_multi_arch():
    plan = plan_jobs(16, 125 * GIB, UNIT, arch_count=4, nvcc_threads=4)
    assert (plan.jobs, plan.nvcc_threads) == (4, 4)


def test_env_for_styles_differ_by_the_vllm_division():
    plan = plan_jobs(16, 30 * GIB, UNIT, arch_count=2)
    assert plan.env_for("torch-ext") == {"MAX_JOBS": "4", "NVCC_THREADS": "2"}
    assert plan.env_for("vllm") == {"MAX_JOBS": "8", "NVCC_THREADS": "2"}
    assert plan.max_jobs_env == 4
    with pytest.raises(UsageError, match="unknown build style"):
        plan.env_for("make")


def test_memgate_threshold_is_one_more_job():
    plan = plan_jobs(16, 30 * GIB, UNIT, arch_count=2)
    env = memgate_env(plan, UNIT)
    assert int(env["BLACKWHEEL_MEMGATE_MIN_BYTES"]) == job_memory(UNIT, 2) > UNIT
    assert env["BLACKWHEEL_MEMGATE_MAX_WAIT_S"] == "1800"


@pytest.mark.parametrize("bad", [dict(cores=0), dict(unit_mem_bytes=0), dict(arch_count=0),
                                 dict(nvcc_threads=0), dict(available_bytes=-1)])
def test_bad_input_is_a_usage_error(bad):
    args = dict(cores=4, available_bytes=8 * GIB, unit_mem_bytes=UNIT)
    args.update(bad)
    with pytest.raises(UsageError):
        plan_jobs(**args)


@settings(max_examples=400, deadline=None)
@given(cores=st.integers(1, 256), avail=st.integers(0, 2048 * GIB), unit=st.integers(1, 64 * GIB),
       archs=st.integers(1, 8), reserve=st.integers(0, 16 * GIB),
       threads=st.none() | st.integers(1, 16))
def test_never_overcommits(cores, avail, unit, archs, reserve, threads):
    plan = plan_jobs(cores, avail, unit, archs, reserve, threads)
    assert plan.jobs >= 1
    assert plan.jobs * plan.nvcc_threads <= cores
    assert plan.nvcc_threads <= archs
    fits = plan.jobs * job_memory(unit, plan.nvcc_threads) + reserve <= avail
    assert fits or (plan.jobs == 1 and "not even 1 job fits" in plan.reason)


@settings(max_examples=200, deadline=None)
@given(cores=st.integers(1, 128), avail=st.integers(0, 1024 * GIB), unit=st.integers(GIB, 16 * GIB),
       archs=st.integers(1, 6))
def test_no_other_thread_count_keeps_more_cores_busy(cores, avail, unit, archs):
    plan = plan_jobs(cores, avail, unit, archs)
    usable = max(0, avail - DEFAULT_RESERVE)
    for t in range(1, min(archs, cores) + 1):
        jobs = min(usable // job_memory(unit, t), cores // t)
        if jobs >= 1:
            assert jobs * t <= plan.jobs * plan.nvcc_threads


def _fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "250000 100000\n"}, 3),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota(tmp_path, files, expected):
    assert cpu_quota(_fake_cgroup(tmp_path, files)) == expected


def test_machine_resources_takes_the_smallest_limits(tmp_path):
    root = _fake_cgroup(tmp_path / "cg", {"cpu.max": "100000 100000\n", "memory.max": str(3 * GIB),
                                          "memory.current": str(2 * GIB),
                                          "memory.stat": f"anon 1\ninactive_file {GIB // 2}\n"})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 99999999 kB\nMemAvailable: 8388608 kB\n")  # 8 GiB
    cores, avail = machine_resources(root, meminfo)
    assert cores == 1
    assert avail == GIB + GIB // 2  # cgroup headroom, smaller than MemAvailable


def test_machine_resources_on_this_host():
    cores, avail = machine_resources()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert avail > 0

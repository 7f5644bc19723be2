"""bench_build: the unit subset, CPU shares, the touch, the report; and one real side-by-side run of
the generated CUDA extension (upstream and ours at once on one CPU each, then one unit touched)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from blackwheel import cli
from blackwheel.reports import bench_build
from blackwheel.reports.bench_build import cpu_sets, pick_units, render, touch_unit
from blackwheel.toolchain import ninja as nj
from blackwheel.core.errors import UsageError
from tests import cuda_ext
from tests.conftest import needs_nvcc_and_torch


def test_pick_units_spans_heavy_to_light():
    profile = {f"u{i}.o": float(i) for i in range(10)}
    picked = pick_units(profile, 4)
    assert picked[0] == "u9.o" and picked[-1] == "u0.o" and len(set(picked)) == 4
    assert pick_units(profile, 20) == sorted(profile, key=lambda u: -profile[u])


def test_cpu_sets_are_disjoint_together_and_refuse_more_than_there_is():
    up, ours = cpu_sets([7, 3, 5, 1], 2, together=True)
    assert up == {1, 3} and ours == {5, 7}
    with pytest.raises(UsageError, match="needs 6 CPUs; this process may use 4"):
        cpu_sets([0, 1, 2, 3], 3, together=True)


def test_touch_changes_what_the_compiler_sees(tmp_path):
    src = tmp_path / "csrc" / "flash_fwd_hdim64_fp16_sm80.cu"
    src.parent.mkdir()
    src.write_text("int x;\n")
    assert touch_unit(tmp_path, "flash_fwd_hdim64_fp16_sm80.o") == src
    assert "constexpr int blackwheel_bench_touched" in src.read_text()   # code, not a comment
    with pytest.raises(UsageError, match="no single source"):
        touch_unit(tmp_path, "nothing_here.o")


def test_render_states_ratios_limit_and_profile():
    run = {"wall_s": 100.0, "peak_mem_gib": 3.0, "jobs": "2", "nvcc_threads": "1",
           "cache": {"hits": 0, "misses": 9}}
    result = {"package": "p", "version": "1", "target": "hopper", "cores_per_run": 8, "together": True,
              "machine": {"cores": 32, "available_gib": 200.0, "memory_total_gib": 250.0}, "subset": ["a.o"],
              "runs": {"upstream": {**run, "wall_s": 200.0, "jobs": "4"}, "ours": run,
                       "ours_touched": {**run, "wall_s": 12.0, "cache": {"hits": 8, "misses": 1}}},
              "touched_unit": "a.o", "ratio_touched_to_cold": 0.12,
              "ratio_ours_to_upstream": 0.5, "limit_s": 90.0, "ours_over_limit": 1.111,
              "profile": {"units": 1, "unit_seconds_sum": 90.0, "cores": 8, "longest_unit_s": 90.0,
                          "bound_by": "longest unit", "efficiency": 0.11,
                          "slowest_units": [{"unit": "a.o", "seconds": 90.0}]}}
    md = render(result)
    assert "Ours / upstream: **0.5**" in md and "| upstream's command | 200.0 | 3.0 | 4 |" in md
    assert "1 units: a.o" in md and "1.111x" in md and "pinned to 8 CPUs, both at the same time" in md
    assert "| blackwheel, `a.o` touched | 12.0 |" in md and "8 hits / 1 misses" in md
    assert "cache warm / cold: **0.12**" in md and "| a.o | 90.0 |" in md


def test_render_says_when_ours_split_its_long_units():
    run = {"wall_s": 100.0, "peak_mem_gib": 3.0, "jobs": "8", "nvcc_threads": "1", "cache": None}
    result = {"package": "p", "version": "1", "target": "hopper", "cores_per_run": 8, "together": True,
              "machine": {"cores": 16, "available_gib": 100.0}, "subset": ["a.o", "b.o"],
              "runs": {"upstream": {**run, "wall_s": 200.0},
                       "ours": {**run, "nvcc_flags": {"a.o": ["-split-compile=2"], "b.o": ["-split-compile=2"]}}},
              "ratio_ours_to_upstream": 0.5, "limit_s": 90.0, "ours_over_limit": 1.111}
    assert "| blackwheel, cold (`-split-compile=2` on 2 units) | 100.0 |" in render(result)
    del result["runs"]["ours"]["nvcc_flags"]
    assert "| blackwheel, cold | 100.0 |" in render(result)


def test_together_needs_cores(capsys):
    assert cli.main(["bench-build", "flash-attn", "--together"]) == 2
    assert "--together needs --cores" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--split-compile", "1"], ["--split-compile", "2", "--ours-only"]])
def test_split_compile_refuses_what_compares_nothing(args, capsys):
    assert cli.main(["bench-build", "flash-attn", *args]) == 2
    assert "--split-compile N compares ours with ours split" in capsys.readouterr().err


def test_render_states_the_split_verdict():
    run = {"wall_s": 100.0, "peak_mem_gib": 3.0, "jobs": "2", "nvcc_threads": "1", "cache": None}
    verdict = {"flag": "-split-compile=2", "units": ["a.o", "b.o"], "wall_ratio": 1.05,
               "longest_unit_s": {"plain": 80.0, "split": 60.0}, "longest_unit_ratio": 0.75, "keep": False}
    result = {"package": "p", "version": "1", "target": "hopper", "cores_per_run": 4, "together": True,
              "machine": {"cores": 16, "available_gib": 100.0}, "subset": ["a.o", "b.o", "c.o"],
              "runs": {"upstream": None, "ours": run, "ours_split": {**run, "wall_s": 105.0}},
              "split_compile": verdict, "ratio_ours_to_upstream": None, "limit_s": 80.0, "ours_over_limit": 1.25}
    md = render(result)
    assert "| blackwheel, `-split-compile=2` on 2 units | 105.0 |" in md
    assert "wall **1.05**, longest unit **0.75** (80.0 s -> 60.0 s): not both dropped, so it is not kept" in md
    assert "Upstream's command not run" in md


def _use_project(proj, monkeypatch) -> None:
    """blackwheel reads the generated extension's recipes, patches and mirror, offline."""
    for key, value in {"BLACKWHEEL_RECIPES": proj.recipes, "BLACKWHEEL_PATCHES": proj.patches,
                       "BLACKWHEEL_MIRROR": proj.mirror, "BLACKWHEEL_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))


@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for two pinned runs")
def test_side_by_side_for_real(bw_env, monkeypatch, tmp_path):
    _use_project(cuda_ext.make_project(bw_env / "proj", sys.executable), monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["bench-build", cuda_ext.NAME, "--target", "hopper", "--stack", "test", "--cores", "1",
                             "--together", "--touch", "--out", str(out)]) == 0
    result = json.loads((out / f"bench-build-{cuda_ext.NAME}-hopper.json").read_text())
    assert result["cores_per_run"] == 1   # what was asked, not the machine's CPUs
    runs = result["runs"]
    for label in ("upstream", "ours", "ours_touched"):
        assert runs[label]["wall_s"] > 0 and runs[label]["cpus"] == 1
        assert runs[label]["unit_seconds"], f"{label}: no unit compiled"
        assert runs[label]["peak_mem_gib"] > 0, f"{label}: its processes' memory was not seen"
    assert runs["upstream"]["cache"] is None and not runs["upstream"]["host_compiles_cached"]
    assert runs["ours"]["host_compiles_cached"]
    assert runs["ours"]["cache"]["misses"] > 0 and runs["ours"]["cache"]["hits"] == 0   # cold store
    assert runs["ours_touched"]["cache"]["misses"] > 0          # the touched unit is compiled again
    assert result["touched_unit"] == "saxpy.o" and result["ratio_touched_to_cold"] > 0
    assert result["ratio_ours_to_upstream"] == pytest.approx(runs["ours"]["wall_s"] / runs["upstream"]["wall_s"],
                                                             abs=1e-3)
    assert "Ours / upstream" in (out / f"bench-build-{cuda_ext.NAME}-hopper.md").read_text()


@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs for two pinned runs")
def test_split_compile_pair_for_real(bw_env, monkeypatch, tmp_path):
    """Ours against ours with nvcc -split-compile=2 on the unit the profile calls long, at once."""
    proj = cuda_ext.make_project(bw_env / "proj", sys.executable)
    (proj.recipes / "profiles").mkdir()
    (proj.recipes / "profiles" / f"{cuda_ext.NAME}-{cuda_ext.VERSION}.json").write_text(
        json.dumps({"units": {"saxpy.o": 30.0, "elsewhere.o": 1.0}}))    # median 15.5: saxpy.o is long
    _use_project(proj, monkeypatch)
    out = tmp_path / "out"
    assert cli.main(["bench-build", cuda_ext.NAME, "--target", "hopper", "--stack", "test", "--cores", "1",
                     "--together", "--split-compile", "2", "--out", str(out)]) == 0
    result = json.loads((out / f"bench-build-{cuda_ext.NAME}-hopper-split2.json").read_text())
    assert result["cores_per_run"] == 1   # what was asked, not the machine's CPUs
    runs = result["runs"]
    assert runs["upstream"] is None and result["ratio_ours_to_upstream"] is None
    assert runs["ours_split"]["nvcc_flags"] == {"saxpy.o": ["-split-compile=2"]} and "nvcc_flags" not in runs["ours"]
    for label in ("ours", "ours_split"):    # each on its own CPU and its own cold store
        assert runs[label]["cpus"] == 1 and runs[label]["unit_seconds"].get("saxpy.o", 0) > 0
        assert runs[label]["cache"]["misses"] > 0 and runs[label]["cache"]["hits"] == 0
    # what ninja ran for the unit: the split run's command has the flag, the plain one's has not
    commands = {}
    for build_ninja in (bw_env / "work" / "bench-build").glob("*/src/*/build/*/build.ninja"):
        nf = nj.parse_ninja(build_ninja)
        edge = next(e for e in nf.edges if any(nj.unit_key(o) == "saxpy.o" for o in e.outputs))
        commands[build_ninja.relative_to(bw_env / "work" / "bench-build").parts[0]] = nj.edge_command(nf, edge)
    assert "-split-compile=2" in commands["ours-split"] and "-split-compile" not in commands["ours"]
    verdict = result["split_compile"]
    assert verdict["units"] == ["saxpy.o"] and verdict["flag"] == "-split-compile=2"
    assert verdict["wall_ratio"] == pytest.approx(runs["ours_split"]["wall_s"] / runs["ours"]["wall_s"], abs=1e-3)
    assert verdict["keep"] == (verdict["wall_ratio"] < 1 and verdict["longest_unit_ratio"] < 1)
    assert "`-split-compile=2` / plain" in (out / f"bench-build-{cuda_ext.NAME}-hopper-split2.md").read_text()

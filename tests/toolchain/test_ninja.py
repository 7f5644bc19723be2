"""ninja helpers against the real ninja: command evaluation, log hashes, and start order."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blackwheel.toolchain import ninja as nj
from blackwheel.core.errors import UsageError

VENV_NINJA = Path(sys.executable).with_name("ninja")
NINJAS = [str(p) for p in (VENV_NINJA, Path("/usr/bin/ninja")) if p.exists()]
if not NINJAS:
    pytest.skip("no ninja installed", allow_module_level=True)

TRICKY = """\
# a header comment
ninja_required_version = 1.3
root = /opt/some$ dir
cflags = -O2 -DNAME=\\"x\\" -I$root/include
long = {long}
sp =   :   

rule cc
  command = echo $out >> order && ${{pre}}true $cflags $extra ${{long}} -c $in -o $out && ${{sp}}touch $out
  description = CC $out

rule link
  command = echo $out >> order && true $in && touch $out

build a.o: cc src/a.cc | hdr.h || order_dep
  extra = -DEDGE=1
  pre = true 
build b$ c.o: cc src/b$ c.cc
build lib.so: link a.o b$ c.o
default lib.so
"""


def _project(tmp_path: Path, text: str = TRICKY) -> Path:
    (tmp_path / "build.ninja").write_text(text.format(long="-Dpad" * 40))
    for name in ("src/a.cc", "src/b c.cc", "hdr.h"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "build.ninja").write_text(
        (tmp_path / "build.ninja").read_text() + "build order_dep: phony\n")
    return tmp_path


def _log_hashes(build_dir: Path) -> dict[str, str]:
    lines = (build_dir / ".ninja_log").read_text().splitlines()[1:]
    return {f.split("\t")[3]: f.split("\t")[4] for f in lines}


@pytest.mark.parametrize("ninja", NINJAS)
def test_commands_and_hashes_match_real_ninja(tmp_path, ninja):
    build = _project(tmp_path)
    nf = nj.parse_ninja(build / "build.ninja")
    ours = {e.outputs[0]: nj.edge_command(nf, e) for e in nf.edges if e.rule != "phony"}
    for output, command in ours.items():
        real = subprocess.run([ninja, "-t", "commands", "-s", output], cwd=build, text=True,
                              capture_output=True, check=True).stdout.strip().splitlines()[-1]
        assert command == real
    subprocess.run([ninja, "-j1"], cwd=build, check=True, capture_output=True)
    version = int((build / ".ninja_log").read_text().split()[3][1:])
    assert version == nj.log_version_for(nj.ninja_version(ninja)) or version == 6
    expected = {o: f"{nj.command_hash(c, version):x}" for o, c in ours.items()}
    assert {o: int(h, 16) for o, h in _log_hashes(build).items()} == {
        o: int(h, 16) for o, h in expected.items()}
    assert len(ours["a.o"]) > 96  # exercises the long-input path of both hashes


def test_seeded_log_has_ninjas_own_hashes(tmp_path):
    build = _project(tmp_path)
    assert nj.seed_ninja_log(build, {"a.o": 3.0, "b c.o": 1.5, "lib.so": 0.25},
                             str(VENV_NINJA)) == 3
    seeded = _log_hashes(build)
    assert nj.read_ninja_log(build) == {"a.o": 3.0, "b c.o": 1.5, "lib.so": 0.25}
    subprocess.run([str(VENV_NINJA), "-j1"], cwd=build, check=True, capture_output=True)
    assert {o: int(h, 16) for o, h in _log_hashes(build).items()} == {
        o: int(h, 16) for o, h in seeded.items()}
    assert (build / "lib.so").exists()  # a seed never marks outputs up to date


SLEEPS = {f"u{i}.o": 0.1 * (i + 1) for i in range(6)}  # declared shortest first


def _units(tmp_path: Path) -> Path:
    tmp_path.mkdir(exist_ok=True)
    lines = ["rule s\n  command = echo $out >> order && touch $out\n"]
    lines += [f"build {name}: s\n" for name in SLEEPS]
    (tmp_path / "build.ninja").write_text("".join(lines))
    return tmp_path


def _start_order(build: Path, ninja: str, jobs: int = 1) -> list[str]:
    subprocess.run([ninja, f"-j{jobs}"], cwd=build, check=True, capture_output=True)
    return (build / "order").read_text().split()


def test_seeding_the_log_does_not_change_the_order(tmp_path):
    """Why order_longest_first exists: ninja weighs every edge 1, whatever the log says."""
    build = _units(tmp_path)
    nj.seed_ninja_log(build, SLEEPS, str(VENV_NINJA))
    assert _start_order(build, str(VENV_NINJA)) == list(SLEEPS)


@pytest.mark.parametrize("ninja", NINJAS)
def test_longest_first_after_reordering(tmp_path, ninja):
    build = _units(tmp_path)
    assert nj.order_longest_first(build, SLEEPS) == 6
    assert _start_order(build, ninja) == sorted(SLEEPS, key=SLEEPS.get, reverse=True)
    assert nj.order_longest_first(build, SLEEPS) == 0  # idempotent


def test_unknown_units_get_the_median_and_names_match_across_folders(tmp_path):
    build = _units(tmp_path)
    past = {f"/elsewhere/build/{k}": v for k, v in SLEEPS.items() if k != "u2.o"}
    nj.order_longest_first(build, past)
    order = _start_order(build, str(VENV_NINJA))
    # u2 has no past time: it gets the median (0.4 s, u3's), and ties keep file order
    assert order == ["u5.o", "u4.o", "u2.o", "u3.o", "u1.o", "u0.o"]


def test_reorder_refuses_files_with_rules_after_builds(tmp_path):
    text = "rule a\n  command = touch $out\nbuild x: a\nrule b\n  command = touch $out\nbuild y: b\n"
    (tmp_path / "build.ninja").write_text(text)
    assert nj.order_longest_first(tmp_path, {"y": 9.0, "x": 1.0}) == 0
    assert (tmp_path / "build.ninja").read_text() == text


def test_shim_reorders_runs_and_keeps_the_log(tmp_path):
    build = _units(tmp_path / "b")
    (tmp_path / "times.json").write_text(json.dumps(SLEEPS))
    shim = nj.write_ninja_shim(tmp_path / "shim", str(VENV_NINJA))
    env = dict(os.environ, PATH=f"{shim.parent}:{os.environ['PATH']}",
               **{nj.SHIM_TIMES_ENV: str(tmp_path / "times.json"),
                  nj.SHIM_LOGS_ENV: str(tmp_path / "logs")})
    assert shutil.which("ninja", path=env["PATH"]) == str(shim)
    version = subprocess.run(["ninja", "--version"], env=env, capture_output=True, text=True)
    assert version.stdout.strip() and version.returncode == 0
    subprocess.run(["ninja", "-v", "-j", "1"], cwd=build, env=env, check=True, capture_output=True)
    assert (build / "order").read_text().split()[0] == "u5.o"
    logs = sorted((tmp_path / "logs").glob("*.ninja_log"))
    assert [p.name for p in logs] == ["000.ninja_log"]
    assert "u5.o" in logs[0].read_text()


def test_shim_written_over_itself_stays_a_shim_of_the_real_ninja(tmp_path):
    shim = nj.write_ninja_shim(tmp_path / "shim", str(VENV_NINJA))
    again = nj.write_ninja_shim(tmp_path / "shim", str(shim))   # found first on a PATH it heads
    assert again == shim and str(VENV_NINJA) in shim.read_text()
    version = subprocess.run([str(shim), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.strip()


def test_read_log_later_runs_win_and_bad_files_are_refused(tmp_path):
    (tmp_path / ".ninja_log").write_text("# ninja log v7\n0\t500\t0\ta.o\tff\n10\t30\t0\ta.o\tff\n")
    assert nj.read_ninja_log(tmp_path) == {"a.o": 0.02}
    assert nj.read_ninja_log(tmp_path / "missing") == {}
    (tmp_path / ".ninja_log").write_text("garbage\n")
    with pytest.raises(UsageError, match="not a ninja log"):
        nj.read_ninja_log(tmp_path)


@pytest.mark.parametrize("line, expected", [
    ("[12/73] /usr/local/cuda/bin/nvcc -c x.cu", (12, 73)),
    ("  [1/1] c++ x.o", (1, 1)),
    ("ninja: build stopped", None),
    ("[x/73] nope", None),
])
def test_unit_progress(line, expected):
    assert nj.unit_progress(line) == expected


def test_build_profile_names_the_bound():
    units = {"/b/fwd_split.cuda.o": 600.0, "/b/bwd.cuda.o": 300.0, "/b/api.o": 100.0}
    cpu_bound = nj.build_profile(units, wall_s=1000.0, cores=1, peak_rss_bytes=5, cache_stats=None)
    assert cpu_bound["bound_by"] == "cpu" and cpu_bound["lower_bound_s"] == 1000.0
    assert cpu_bound["efficiency"] == 1.0
    tail = nj.build_profile(units, wall_s=700.0, cores=16, peak_rss_bytes=None, cache_stats={"hits": 1})
    assert tail["bound_by"] == "longest unit" and tail["lower_bound_s"] == 600.0
    assert tail["slowest_units"][0] == {"unit": "fwd_split.cuda.o", "seconds": 600.0}
    assert tail["efficiency"] == round(1000 / (700 * 16), 3)
    with pytest.raises(UsageError):
        nj.build_profile(units, wall_s=0, cores=1, peak_rss_bytes=None, cache_stats=None)


def test_commands_of_a_build_ninja_written_by_torch(tmp_path):
    """The file format torch's cpp_extension writes (flash-attn's build), evaluated like ninja."""
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    sources = [str(tmp_path / "src dir" / n) for n in ("flash_api.cpp", "fwd_hdim128.cu")]
    cpp_extension._write_ninja_file(
        path=str(tmp_path / "build.ninja"), cflags=["-O3", "-I/x/include"], post_cflags=["-std=c++17"],
        cuda_cflags=["-O3"], cuda_post_cflags=["-gencode", "arch=compute_120,code=sm_120"],
        cuda_dlink_post_cflags=None, sycl_cflags=None, sycl_post_cflags=None,
        sycl_dlink_post_cflags=None, sources=sources,
        objects=[str(tmp_path / "flash_api.o"), str(tmp_path / "fwd_hdim128.cuda.o")],
        ldflags=None, library_target=None, with_cuda=True, with_sycl=False)
    nf = nj.parse_ninja(tmp_path / "build.ninja")
    assert [e.rule for e in nf.edges] == ["compile", "cuda_compile"]
    for edge in nf.edges:
        real = subprocess.run([str(VENV_NINJA), "-t", "commands", "-s", edge.outputs[0]], cwd=tmp_path,
                              text=True, capture_output=True, check=True).stdout.strip()
        assert nj.edge_command(nf, edge) == real


def test_reorders_a_cmake_generated_build(tmp_path):
    """vLLM's build.ninja comes from CMake: includes rules.ninja, phony and link edges."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(1, 5):
        (src / f"f{i}.cpp").write_text(f"int f{i}() {{ return {i}; }}\n")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(demo CXX)\n"
                                        "add_library(a SHARED f1.cpp f2.cpp)\n"
                                        "add_library(b SHARED f3.cpp f4.cpp)\n")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(src), "-B", str(build), "-G", "Ninja",
                    f"-DCMAKE_MAKE_PROGRAM={VENV_NINJA}"], check=True, capture_output=True)
    assert nj.order_longest_first(build, {"f1.cpp.o": 1.0, "f2.cpp.o": 2.0, "f3.cpp.o": 5.0,
                                          "f4.cpp.o": 9.0}) > 0
    out = subprocess.run([str(VENV_NINJA), "-j1", "-v"], cwd=build, check=True, capture_output=True,
                         text=True).stdout
    compiled = re.findall(r" -o (\S+\.cpp\.o) ", out)
    assert [nj.unit_key(c) for c in compiled][:4] == ["f4.cpp.o", "f3.cpp.o", "f2.cpp.o", "f1.cpp.o"]


def test_subset_outputs_pick_named_units_and_refuse_unknown_ones(tmp_path):
    from blackwheel.core.errors import UsageError
    from blackwheel.toolchain.ninja import subset_outputs

    (tmp_path / "build.ninja").write_text(
        "rule cc\n  command = touch $out\n"
        "build /b/x/a.o: cc\nbuild /b/x/split.o: cc\nbuild /b/x/c.o: cc\n")
    assert subset_outputs(tmp_path, None) == []
    assert subset_outputs(tmp_path, "c.o,a.o") == ["/b/x/a.o", "/b/x/c.o"]
    with pytest.raises(UsageError, match="nope.o"):
        subset_outputs(tmp_path, "a.o,nope.o")


def _nvcc_project(tmp_path: Path) -> Path:
    """torch's shape: the compiler in a variable with a launcher in front, one rule for every unit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("nvcc", "launcher"):   # each records its argv, one file per output
        (bin_dir / name).write_text(
            '#!/bin/sh\nout=; prev=; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
            f'echo {name} "$@" >> "$out.{name}"\n' + ('exec "$@"\n' if name == "launcher" else 'touch "$out"\n'))
        (bin_dir / name).chmod(0o755)
    build = tmp_path / "b"
    (build / "src").mkdir(parents=True)
    for unit in ("long", "short", "api"):
        (build / "src" / f"{unit}.cu").write_text("")
    (build / "build.ninja").write_text(
        f"nvcc = {bin_dir}/launcher {bin_dir}/nvcc\n"
        "cuda_cflags = -O3 '-DPRICE=$$5'\n"  # $$: ninja's escape, kept through the rewrite
        "rule cuda_compile\n  command = $nvcc -o $out $in $cuda_cflags\n"
        "rule cc\n  command = touch $out\n"
        "build long.cuda.o: cuda_compile src/long.cu\n"
        "build short.cuda.o: cuda_compile src/short.cu\n"
        "build api.o: cc src/api.cu\n")
    return build


def test_nvcc_flags_reach_only_the_named_units_through_the_shim(tmp_path):
    build = _nvcc_project(tmp_path)
    (tmp_path / "flags.json").write_text(json.dumps({"long.cuda.o": ["-split-compile=2"], "gone.o": ["-x"]}))
    shim = nj.write_ninja_shim(tmp_path / "shim", str(VENV_NINJA))
    env = dict(os.environ, PATH=f"{shim.parent}:{os.environ['PATH']}",
               **{nj.SHIM_FLAGS_ENV: str(tmp_path / "flags.json"), nj.SHIM_LOGS_ENV: str(tmp_path / "logs")})
    subprocess.run(["ninja", "-j", "1"], cwd=build, env=env, check=True, capture_output=True)
    # what nvcc itself was given, behind the launcher (which saw the flag too: sccache keys on it)
    assert (build / "long.cuda.o.nvcc").read_text().split() == [
        "nvcc", "-split-compile=2", "-o", "long.cuda.o", "src/long.cu", "-O3", "-DPRICE=$5"]
    assert "-split-compile=2" in (build / "long.cuda.o.launcher").read_text()
    assert "-split-compile" not in (build / "short.cuda.o.nvcc").read_text()
    assert (tmp_path / "logs" / nj.FLAGS_APPLIED).read_text() == "long.cuda.o\n"
    nf = nj.parse_ninja(build / "build.ninja")   # our reader agrees with ninja on the rewritten file
    for edge in nf.edges:
        real = subprocess.run([str(VENV_NINJA), "-t", "commands", "-s", edge.outputs[0]], cwd=build,
                              text=True, capture_output=True, check=True).stdout.strip()
        assert nj.edge_command(nf, edge) == real


def test_nvcc_flags_refuse_a_unit_nvcc_does_not_compile_and_are_given_once(tmp_path):
    build = _nvcc_project(tmp_path)
    before = (build / "build.ninja").read_text()
    with pytest.raises(UsageError, match="api.o is not an nvcc compile"):
        nj.add_nvcc_flags(build, {"long.cuda.o": ["-split-compile=2"], "api.o": ["-split-compile=2"]})
    assert (build / "build.ninja").read_text() == before     # nothing half-written
    assert nj.add_nvcc_flags(build, {}) == [] and (build / "build.ninja").read_text() == before
    assert nj.add_nvcc_flags(build, {"long.cuda.o": ["-split-compile=2"]}) == ["long.cuda.o"]
    once = (build / "build.ninja").read_text()
    assert once != before and once.count("-split-compile=2") == 1
    # ninja run again on the same file (CMake builds run it once a target): the flag is not doubled
    assert nj.add_nvcc_flags(build, {"long.cuda.o": ["-split-compile=2"]}) == ["long.cuda.o"]
    assert (build / "build.ninja").read_text() == once


@pytest.mark.nvcc
def test_nvcc_flags_in_a_cmake_cuda_build(tmp_path):
    """vLLM's shape: CMake's CUDA rule, with a compiler launcher in front (sccache there)."""
    cmake, nvcc = shutil.which("cmake"), Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if cmake is None or not nvcc.is_file():
        pytest.skip("needs cmake and nvcc")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("long", "short"):
        (src / f"{name}.cu").write_text(f"__global__ void {name}_kernel(float* x) {{ x[0] = 1.f; }}\n")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(demo CUDA)\n"
                                        "add_library(k SHARED long.cu short.cu)\n")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(src), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={VENV_NINJA}",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=90",
                    "-DCMAKE_CUDA_COMPILER_LAUNCHER=env"], check=True, capture_output=True)
    assert nj.add_nvcc_flags(build, {"long.cu.o": ["-split-compile=2"]}) == ["long.cu.o"]
    ran = subprocess.run([str(VENV_NINJA), "-j1", "-v"], cwd=build, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    ran = ran.stdout
    line = {name: next(x for x in ran.splitlines() if f"/{name}.cu.o " in x) for name in ("long", "short")}
    assert f"env {nvcc} -split-compile=2 " in line["long"] and "-split-compile" not in line["short"]

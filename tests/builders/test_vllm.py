"""vLLM build plan: the configure command, the GCC gate, and reading real configure output.

The fixtures in tests/fixtures/vllm_plan/ are real CMake configure logs of vllm 0.25.1 on this
machine (cmake 3.31, nvcc 13.0.88, GCC 12.2, torch 2.14.1+cu130 in the venv), sources from the
local mirror, FETCHCONTENT_FULLY_DISCONNECTED=ON:
- patched-gb10 / patched-blackwell: our patches 0001-0003, TORCH_CUDA_ARCH_LIST 12.1a / 12.0f;12.1a
  (configure completes; generate fails only because this host has no libcuda);
- unpatched-gb10: upstream's sdist, 12.1a (collapses to 12.0, then stops at the missing FlashMLA).
Fast tests (well under a second); the one real configure is marked slow (about 90-110 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from blackwheel.core.errors import ToolchainError, VerifyFailed
from blackwheel.core.targets import TARGETS, CudaArch, parse_arch_list
from blackwheel.toolchain.machine import gcc_version
from blackwheel.builders.vllm import _torch_nvidia_lib, toolkit_link_env
from blackwheel.builders.vllm import (ConfigureSpec, configure_command, lacking_native,
                                  parse_build_ninja, parse_configure, require_gcc, require_native)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "vllm_plan"
ARCH_SPECIFIC = ["scaled_mm_c3x_sm120", "SM12x NVFP4", "moe_data", "DeepGEMM"]


def plan_of(name: str):
    return parse_configure((FIXTURES / f"{name}.log").read_text())


def test_configure_command_is_setup_py_without_downloads(tmp_path):
    spec = ConfigureSpec(tmp_path / "src", tmp_path / "b", "/venv/bin/python", "12.0f;12.1a",
                         {"VLLM_CUTLASS_SRC_DIR": tmp_path / "cutlass"}, Path("/opt/cuda"))
    argv, env = configure_command(spec)
    assert argv[:7] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "b"), "-G", "Ninja"]
    assert "-DFETCHCONTENT_FULLY_DISCONNECTED=ON" in argv
    assert f"-DFETCHCONTENT_BASE_DIR={tmp_path / 'b' / '_deps'}" in argv
    assert "-DVLLM_PYTHON_EXECUTABLE=/venv/bin/python" in argv
    assert "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc" in argv
    assert env["TORCH_CUDA_ARCH_LIST"] == "12.0f;12.1a"
    assert env["VLLM_CUTLASS_SRC_DIR"] == str(tmp_path / "cutlass")
    assert env["PATH"].startswith("/opt/cuda/bin")


def test_find_cmake_refuses_an_old_cmake(tmp_path, monkeypatch):
    from blackwheel.builders.vllm import find_cmake
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cmake").write_text("#!/bin/sh\necho 'cmake version 3.25.1'\n")
    (fake / "cmake").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(ToolchainError, match=r"CMake >= 3.26 .*3\.25\.1 at .*cmake"):
        find_cmake(str(fake / "python"))
    (fake / "cmake").write_text("#!/bin/sh\necho 'cmake version 3.31.10'\n")
    assert find_cmake(str(fake / "python")) == str(fake / "cmake")


def test_gcc_gate_refuses_0_33_on_gcc_12_before_cmake():
    with pytest.raises(ToolchainError, match=r"vllm 0.33.0 needs GCC >=13 .* found 12.2.0"):
        require_gcc("vllm", "0.33.0", SpecifierSet(">=13"), Version("12.2.0"))
    require_gcc("vllm", "0.25.1", SpecifierSet(">=11.3"), Version("12.2.0"))   # accepted
    require_gcc("vllm", "0.33.0", SpecifierSet(">=13"), None)                  # not GCC: CMake decides


def test_gcc_gate_on_this_host():
    """0.33.0 needs GCC >= 13: on a host with an older g++ we refuse it ourselves, clearly."""
    found = gcc_version()
    if found is None:
        pytest.skip("no GCC here")
    if found in SpecifierSet(">=13"):
        require_gcc("vllm", "0.33.0", SpecifierSet(">=13"), found)
    else:
        with pytest.raises(ToolchainError, match="needs GCC >=13"):
            require_gcc("vllm", "0.33.0", SpecifierSet(">=13"), found)


def test_patched_gb10_keeps_12_1a_everywhere():
    plan = plan_of("0.25.1-patched-gb10")
    assert plan.requested == plan.supported == (CudaArch(12, 1, "a"),)
    assert plan.configured
    for name in ARCH_SPECIFIC + ["fp32_router_gemm", "DSV3 router GEMM"]:
        assert plan.families[name].archs == (CudaArch(12, 1, "a"),), name
    # "8.0+PTX": the sm_80 cubin and compute_80 PTX (the built wheel holds both: docs/reports/vllm-gb10-h200.md)
    assert plan.families["FA2"].archs == plan.families["FA2"].ptx == (CudaArch(8, 0),)
    assert plan.families["FlashMLA"].skipped.startswith("no supported arch")
    assert plan.families["fmha_sm100"].skipped
    assert plan.families["Machete"].skipped == "no compatible archs found in CUDA target architectures"
    assert any("CUDA::cuda_driver" in e or "NOTFOUND" in e for e in plan.errors)
    assert lacking_native(plan, ARCH_SPECIFIC, TARGETS["gb10"], (CudaArch(12, 1, "a"),)) == []
    assert plan.families["QuTLASS"].built                       # it prints no archs when it builds


def test_patched_blackwell_builds_both_12x_archs():
    plan = plan_of("0.25.1-patched-blackwell")
    both = parse_arch_list("12.0f;12.1a")
    assert plan.supported == both
    for name in ARCH_SPECIFIC:
        assert plan.families[name].archs == both, name
    assert lacking_native(plan, ARCH_SPECIFIC, TARGETS["blackwell"], both) == []


def test_unpatched_gb10_collapses_to_12_0_and_the_check_says_so():
    plan = plan_of("0.25.1-unpatched-gb10")
    assert plan.requested == (CudaArch(12, 1, "a"),)
    assert plan.supported == (CudaArch(12, 0),)               # issue #36835
    assert not plan.configured
    assert plan.families["scaled_mm_c3x_sm120"].archs == (CudaArch(12, 0, "f"),)
    assert any("flash_mla_interface.py" in e or "flashmla.cmake" in e for e in plan.errors)
    # a 12.0f cubin still runs on 12.1, so only the wanted 12.1a is reported missing
    lacking = lacking_native(plan, ARCH_SPECIFIC, TARGETS["gb10"], (CudaArch(12, 1, "a"),))
    assert lacking == [f"{n}: built for 12.0f, not 12.1a" for n in ARCH_SPECIFIC]
    with pytest.raises(VerifyFailed, match="target gb10 .* scaled_mm_c3x_sm120: built for 12.0f"):
        require_native(plan, ARCH_SPECIFIC, TARGETS["gb10"], (CudaArch(12, 1, "a"),))


def test_gb10_plan_lacks_native_code_for_sm120():
    plan = plan_of("0.25.1-patched-gb10")
    lacking = lacking_native(plan, ["SM12x NVFP4", "Machete", "no-such-family"], TARGETS["sm120"])
    assert lacking[0] == "SM12x NVFP4: built for 12.1a, no cubin that runs on 12.0"
    assert lacking[1].startswith("Machete: skipped (")
    assert lacking[2].startswith("no-such-family: CMake printed nothing")


def test_rows_are_a_readable_table():
    rows = dict(plan_of("0.25.1-patched-blackwell").rows())
    assert rows["SM12x NVFP4"] == "12.0f;12.1a"
    assert rows["Marlin"] == "8.0 + PTX 8.0"
    assert rows["hadacore"] == "built (archs not printed)"
    assert rows["FA3"] == "skipped: no arch of the target is in its list"


def test_parse_build_ninja_reads_gencode_per_target():
    text = "\n".join([
        "build CMakeFiles/_C_stable_libtorch.dir/csrc/a.cu.o: CUDA_COMPILER__x /s/a.cu",
        "  FLAGS = -O3 \"-gencode arch=compute_121a,code=sm_121a\" -gencode arch=compute_120f,code=sm_120f",
        "build vllm-flash-attn/CMakeFiles/_vllm_fa2_C.dir/csrc/f.cu.o: CUDA_COMPILER__y /s/f.cu",
        "  FLAGS = -gencode arch=compute_80,code=sm_80 -gencode arch=compute_80,code=compute_80",
        "build CMakeFiles/_C_stable_libtorch.dir/csrc/b.cpp.o: CXX_COMPILER__x /s/b.cpp",
        "  FLAGS = -gencode arch=compute_90a,code=sm_90a",
    ])
    got = parse_build_ninja(text)
    assert got["_C_stable_libtorch"]["cubins"] == parse_arch_list("12.0f;12.1a")
    assert got["_vllm_fa2_C"] == {"cubins": (CudaArch(8, 0),), "ptx": (CudaArch(8, 0),)}


def test_build_ninja_excerpt_shows_each_library_gets_both_12x_cubins():
    libs = parse_build_ninja((FIXTURES / "0.25.1-patched-blackwell.build.ninja").read_text())
    both = parse_arch_list("12.0f;12.1a")
    for lib in ("_C_stable_libtorch", "_moe_C_stable_libtorch", "_qutlass_C"):
        assert set(both) <= set(libs[lib]["cubins"]), lib
        assert TARGETS["blackwell"].uncovered(libs[lib]["cubins"]) == []
    assert TARGETS["blackwell"].uncovered(libs["_vllm_fa2_C"]["cubins"]) == [CudaArch(12, 0).cc, CudaArch(12, 1).cc]
    assert libs["_vllm_fa3_C"] == {"cubins": (), "ptx": ()}   # no -gencode at all: patch 0004


@pytest.mark.slow
@pytest.mark.nvcc
def test_real_configure_gb10(tmp_path):
    """Configure patched 0.25.1 for gb10 from prepared trees (about 90 s); skips without them.

    Prepare: extract the sdist to /tmp/p25 and apply patches/vllm/0.25.1/*; check the four pinned
    resources out of the mirror into /tmp/trees/<name>-0.25.1 (blackwheel.sources.mirror.checkout).
    """
    import sys
    from blackwheel.builders.vllm import plan_build, plan_only_cmake_args
    src, trees = Path("/tmp/p25/vllm-0.25.1"), Path("/tmp/trees")
    if not (src / "CMakeLists.txt").is_file() or not (trees / "cutlass-0.25.1").is_dir():
        pytest.skip("patched vllm 0.25.1 tree and resource trees not prepared")
    if shutil.which("ninja") is None:
        pytest.skip("ninja not on PATH")
    (tmp_path / "triton").mkdir()
    dirs = {"VLLM_CUTLASS_SRC_DIR": trees / "cutlass-0.25.1", "VLLM_FLASH_ATTN_SRC_DIR": trees / "fa-0.25.1",
            "QUTLASS_SRC_DIR": trees / "qutlass-0.25.1", "DEEPGEMM_SRC_DIR": trees / "deepgemm-0.25.1",
            "TRITON_KERNELS_SRC_DIR": tmp_path / "triton"}
    from blackwheel.builders.vllm import find_cmake
    spec = ConfigureSpec(src, tmp_path / "build", sys.executable, "12.1a", dirs,
                         extra_cmake_args=tuple(plan_only_cmake_args(Path("/usr/local/cuda"), sys.executable)),
                         cmake=find_cmake(sys.executable))
    plan, libs, run = plan_build(spec)
    assert run.returncode == 0, plan.errors
    assert plan.supported == (CudaArch(12, 1, "a"),)
    assert plan.families["SM12x NVFP4"].archs == (CudaArch(12, 1, "a"),)
    assert CudaArch(12, 1, "a") in libs["_C_stable_libtorch"]["cubins"]
    assert CudaArch(12, 0, "f") not in libs["_C_stable_libtorch"]["cubins"]


def test_hopper_plan_needs_flashmla_and_builds_hopper_families():
    plan = plan_of("0.25.1-patched-hopper")
    assert plan.supported == (CudaArch(9, 0, "a"),)
    hopper = ["scaled_mm_c3x_sm90", "FA3", "FlashMLA", "Machete"]
    assert lacking_native(plan, hopper, TARGETS["hopper"]) == []
    assert plan.families["QuTLASS"].skipped.startswith("no supported arch (12.0f / 10.0f)")
    assert plan.families["fmha_sm100"].skipped                  # patch 0003: MSA not needed
    assert any("flashmla.cmake" in e for e in plan.errors)      # FlashMLA's source is not here
    assert not plan.configured


def test_a_configure_log_read_through_pip_is_read_the_same():
    """pip indents what the build prints: `blackwheel plan` reads its families from pip's log."""
    text = (FIXTURES / "0.25.1-patched-gb10.log").read_text()
    indented = "\n".join("  " + line for line in text.splitlines())
    assert parse_configure(indented).rows() == parse_configure(text).rows() != []


NVRTC_USER = "const char* nvrtcGetErrorString(int);\nint main(void) { return nvrtcGetErrorString(0) == 0; }\n"


def test_a_slim_toolkit_links_lnvrtc_from_the_torch_wheel(tmp_path):
    """vLLM's DeepGEMM step links with a bare -lnvrtc, outside CMake: on a toolkit without libnvrtc
    the build environment's LIBRARY_PATH must find the torch wheel's copy."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or _torch_nvidia_lib(sys.executable, "libnvrtc.so.13") is None:
        pytest.skip("needs a C compiler and torch's nvidia wheels (libnvrtc.so.13)")
    slim = tmp_path / "cuda"                     # a toolkit with no lib64 at all
    (tmp_path / "t.c").write_text(NVRTC_USER)
    cmd = [cc, str(tmp_path / "t.c"), "-lnvrtc", "-o", str(tmp_path / "t")]
    env = {"PATH": os.environ["PATH"]}
    assert subprocess.run(cmd, env=env, capture_output=True).returncode != 0   # without: cannot find -lnvrtc
    link_env = toolkit_link_env(slim, sys.executable, tmp_path / "stubs", {"LIBRARY_PATH": "/nowhere"})
    assert link_env["LIBRARY_PATH"].split(os.pathsep) == [str((tmp_path / "stubs").resolve()), "/nowhere"]
    linked = subprocess.run(cmd, env={**env, **link_env}, capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    # a toolkit that has its own libnvrtc needs nothing
    (slim / "lib64").mkdir(parents=True)
    (slim / "lib64" / "libnvrtc.so").write_text("")
    assert toolkit_link_env(slim, sys.executable, tmp_path / "stubs2", {}) == {}

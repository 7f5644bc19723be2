"""toolchain.py: finding CUDA (through wrapper scripts), compiler versions, the early refusals, the
build environment, and one real probe of this machine. Fake tools are tiny shell scripts in tmp_path."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from blackwheel.toolchain import toolchain
from blackwheel.core.errors import ToolchainError
from blackwheel.toolchain.machine import resolve_nvcc
from blackwheel.toolchain.toolchain import (Toolchain, build_env, check, find_cuda_home, host_compiler, nvcc_version,
                                            probe)

NVCC_OUT = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
SRC = Path(toolchain.__file__).parents[1]   # the blackwheel package, every stage


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def fake_cuda(root: Path, out: str = NVCC_OUT) -> Path:
    """root/bin/nvcc printing ``out``: a toolkit as far as finding and versioning go."""
    script(root / "bin" / "nvcc", f"cat <<'EOF'\n{out}EOF")
    return root


# ---- resolve_nvcc -----------------------------------------------------------------------------------------
def test_resolve_through_wrappers_and_symlinks(tmp_path):
    cuda = fake_cuda(tmp_path / "cuda-13.0")
    inner = script(tmp_path / "inner" / "nvcc", f'exec {cuda}/bin/nvcc "$@"')
    outer = script(tmp_path / "outer" / "nvcc", f'# a wrapper\nexport X=1\nexec "{inner}" "$@"')
    (tmp_path / "link").mkdir()
    os.symlink(outer, tmp_path / "link" / "nvcc")
    assert resolve_nvcc(tmp_path / "link" / "nvcc") == cuda / "bin" / "nvcc"
    assert resolve_nvcc(cuda / "bin" / "nvcc") == cuda / "bin" / "nvcc"


def test_relative_exec_is_not_followed(tmp_path):
    w = script(tmp_path / "w" / "nvcc", 'exec ../cuda/bin/nvcc "$@"')
    assert resolve_nvcc(w) == w


def test_wrapper_loop_ends(tmp_path):
    a, b = tmp_path / "a" / "nvcc", tmp_path / "b" / "nvcc"
    script(a, f'exec {b} "$@"')
    script(b, f'exec {a} "$@"')
    assert resolve_nvcc(a) in (a, b)


def test_the_machines_wrapper():
    wrapper = Path("/usr/local/bin/nvcc")
    if not wrapper.is_file():
        pytest.skip("no /usr/local/bin/nvcc wrapper on this machine")
    real = resolve_nvcc(wrapper)
    assert real != wrapper and real.name == "nvcc" and real.parent.name == "bin"


# ---- find_cuda_home -------------------------------------------------------------------------------------
def test_cuda_home_wins(tmp_path):
    cuda = fake_cuda(tmp_path / "cuda")
    other = fake_cuda(tmp_path / "other")
    assert find_cuda_home({"CUDA_HOME": str(cuda), "PATH": str(other / "bin")}) == (cuda, "$CUDA_HOME")
    assert find_cuda_home({"CUDA_PATH": str(cuda), "PATH": ""}) == (cuda, "$CUDA_PATH")


def test_cuda_home_without_nvcc_is_refused(tmp_path):
    with pytest.raises(ToolchainError, match=r"\$CUDA_HOME=.*has no bin/nvcc"):
        find_cuda_home({"CUDA_HOME": str(tmp_path), "PATH": ""})


def test_wrapper_on_path_leads_to_the_toolkit(tmp_path):
    cuda = fake_cuda(tmp_path / "cuda-13.0")
    wrapper = script(tmp_path / "usr-local-bin" / "nvcc", f'exec {cuda}/bin/nvcc "$@"')
    home, how = find_cuda_home({"PATH": f"{tmp_path / 'empty'}:{wrapper.parent}"})
    assert home == cuda
    assert "wrapper" in how and str(wrapper) in how


def test_plain_nvcc_on_path(tmp_path):
    cuda = fake_cuda(tmp_path / "cuda")
    assert find_cuda_home({"PATH": str(cuda / "bin")}) == (cuda, "nvcc on PATH")


def test_unfollowable_wrapper_falls_back_to_the_default(tmp_path):
    script(tmp_path / "bin" / "nvcc", 'exec ccache "$CUDA/bin/nvcc" "$@"')
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        with pytest.raises(ToolchainError, match="no nvcc found"):
            find_cuda_home({"PATH": str(tmp_path / "bin")})
        return
    assert find_cuda_home({"PATH": str(tmp_path / "bin")}) == (Path("/usr/local/cuda"), "/usr/local/cuda")


def test_default_location(tmp_path):
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        with pytest.raises(ToolchainError, match="no nvcc found"):
            find_cuda_home({"PATH": str(tmp_path)})
    else:
        assert find_cuda_home({"PATH": str(tmp_path)}) == (Path("/usr/local/cuda"), "/usr/local/cuda")


# ---- versions ------------------------------------------------------------------------------------------
def test_nvcc_version(tmp_path):
    assert nvcc_version(fake_cuda(tmp_path / "a")) == "13.0.88"
    assert nvcc_version(fake_cuda(tmp_path / "b", "Cuda compilation tools, release 12.8\n")) == "12.8"
    with pytest.raises(ToolchainError, match="cannot read the version"):
        nvcc_version(fake_cuda(tmp_path / "c", "nothing useful\n"))


@pytest.mark.parametrize("first_line, expected", [
    ("g++ (Debian 12.2.0-14) 12.2.0", ("gcc", "12.2.0")),
    ("g++ (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0", ("gcc", "13.3.0")),
    ("c++ (GCC) 14.2.1 20240912 (Red Hat 14.2.1-3)", ("gcc", "14.2.1")),
    ("Ubuntu clang version 18.1.3 (1ubuntu1)", ("clang", "18.1.3")),
])
def test_host_compiler(tmp_path, first_line, expected):
    cxx = script(tmp_path / "cxx", f"echo '{first_line}'\necho 'Copyright (C) 2024'")
    assert host_compiler({"CXX": f"ccache {cxx}"}) == expected


def test_host_compiler_missing(tmp_path):
    with pytest.raises(ToolchainError, match="host compiler"):
        host_compiler({"CXX": str(tmp_path / "no-such-c++")})


# ---- check ---------------------------------------------------------------------------------------------
def tc(**over) -> Toolchain:
    base = dict(cuda_home="/opt/cuda", cuda_found_by="$CUDA_HOME", nvcc="13.0.88", host_compiler="gcc",
                host_compiler_version="13.3.0", torch="2.14.1+cu130", torch_cuda="13.0", cxx11_abi=True,
                torch_arch_list=["sm_90", "sm_120"], python="3.11.2", python_exe="/venv/bin/python",
                platform="linux-aarch64", machine="aarch64", cmake="3.31.6", ninja="1.13.0",
                extra_include=["/venv/site/nvidia/cu13/include"])
    return Toolchain(**{**base, **over})


def test_check_accepts_a_good_toolchain():
    check(tc(), "2.14.1", SpecifierSet(">=13"), "vllm")
    check(tc(host_compiler="clang", host_compiler_version="18.1.3"), "2.14.1", SpecifierSet(">=13"), "vllm")


@pytest.mark.parametrize("over, stack_torch, gcc, match", [
    ({"nvcc": "12.8.93"}, "2.14.1", None, "is CUDA 12; blackwheel builds with CUDA 13"),
    ({"torch": "2.11.0+cu130"}, "2.14.1", None, "torch 2.11.0\\+cu130; the stack pins 2.14.1"),
    ({"torch": "2.14.0"}, "2.14.1", None, "the stack pins 2.14.1"),
    ({"torch_cuda": "12.8"}, "2.14.1", None, "built for CUDA 12.8"),
    ({"torch_cuda": None}, "2.14.1", None, "built for CUDA None"),
    ({"host_compiler_version": "12.2.0"}, "2.14.1", ">=13", "vllm needs GCC >=13; the host compiler is GCC 12.2.0"),
    ({"host_compiler_version": "11.2.0"}, "2.14.1", ">=11.3", "needs GCC >=11.3"),
])
def test_check_refusals(over, stack_torch, gcc, match):
    with pytest.raises(ToolchainError, match=match) as exc:
        check(tc(**over), stack_torch, SpecifierSet(gcc) if gcc else None, "vllm")
    assert "\n" not in str(exc.value)


def test_identity_leaves_out_how_things_were_found():
    ident = tc().identity()
    assert "cuda_found_by" not in ident and "python_exe" not in ident
    assert tc(cuda_found_by="x", python_exe="y").identity() == ident
    assert tc(nvcc="13.0.48").identity() != ident


# ---- build_env -----------------------------------------------------------------------------------------
def test_build_env_puts_cuda_first_and_wheel_headers_on_cpath():
    env = build_env(tc(), {"PATH": "/usr/bin", "CPATH": "/mine:/venv/site/nvidia/cu13/include", "KEEP": "1"})
    assert env["CUDA_HOME"] == "/opt/cuda" and env["KEEP"] == "1"
    assert env["PATH"].split(os.pathsep)[:2] == ["/opt/cuda/bin", "/usr/bin"]
    assert env["CPATH"] == "/mine:/venv/site/nvidia/cu13/include"         # no duplicate, user's first


def test_build_env_without_extra_headers_sets_no_cpath():
    assert "CPATH" not in build_env(tc(extra_include=[]), {"PATH": "/usr/bin"})


# ---- the probe -------------------------------------------------------------------------------------------
def test_platform_and_machine_come_from_the_probe(tmp_path, monkeypatch):
    cuda = fake_cuda(tmp_path / "cuda")
    cxx = script(tmp_path / "g++", "echo 'g++ (GCC) 13.2.0'")
    site = tmp_path / "site"
    (site / "nvidia" / "cu13" / "include").mkdir(parents=True)
    monkeypatch.setattr(toolchain.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(toolchain, "probe_torch", lambda python, cache_dir=None: {
        "torch": "2.14.1+cu130", "torch_cuda": "13.0", "cxx11_abi": True, "arch_list": ["sm_120"],
        "python": "3.12.3", "platform": "linux-aarch64", "purelib": str(site)})
    t = probe("/fake/python", {"CUDA_HOME": str(cuda), "CXX": str(cxx), "PATH": os.environ["PATH"]})
    assert (t.machine, t.platform, t.python, t.python_exe) == ("aarch64", "linux-aarch64", "3.12.3", "/fake/python")
    assert (t.nvcc, t.host_compiler_version, t.cuda_home) == ("13.0.88", "13.2.0", str(cuda))
    assert t.extra_include == [str(site / "nvidia" / "cu13" / "include")]   # minimal toolkit: wheel headers


def test_no_x86_64_in_code():
    """GB10 hosts are aarch64: 'x86_64' may appear in comments and docstrings only."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "x86_64" in node.value \
                    and id(node) not in docstrings:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").exists(), reason="no CUDA toolkit at /usr/local/cuda")
def test_real_probe_of_this_machine():
    """The real thing: nvcc 13 at /usr/local/cuda and this venv's torch (imported only in the probe)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        pytest.skip("no torch in this Python")
    env = {**os.environ, "CUDA_HOME": "/usr/local/cuda"}
    t = probe(sys.executable, env)
    assert t.cuda_major == 13 and t.cuda_found_by == "$CUDA_HOME" and t.cuda_home == "/usr/local/cuda"
    assert t.torch.split("+")[0] == torch_version.split("+")[0]
    assert t.machine == platform.machine() and t.python == platform.python_version()
    assert t.platform.endswith(platform.machine())
    if not Path("/usr/local/cuda/include/cublas_v2.h").exists():
        assert any(p.endswith("include") and "/nvidia/" in p for p in t.extra_include)
    if shutil.which("ninja", path=env["PATH"]):
        assert t.ninja
    if "+cu13" in t.torch:
        assert t.torch_cuda.startswith("13.") and t.torch_arch_list
        check(t, torch_version.split("+")[0], None, "test")


def test_torch_probe_is_kept_per_torch_install(tmp_path, monkeypatch):
    import sys

    from blackwheel.toolchain import toolchain as tc

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "version.py").write_text("__version__ = '1'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setattr(tc, "_TORCH_PROBE", "import json; print(json.dumps({'torch': '1'}))")
    first = tc.probe_torch(sys.executable, tmp_path / "cache")
    assert first == {"torch": "1"}
    monkeypatch.setattr(tc, "_TORCH_PROBE", "raise SystemExit('torch imported again')")
    assert tc.probe_torch(sys.executable, tmp_path / "cache") == first      # the same install: no import
    (fake / "version.py").write_text("__version__ = '2.0'\n")              # reinstalled: probed again
    with pytest.raises(ToolchainError, match="torch imported again"):
        tc.probe_torch(sys.executable, tmp_path / "cache")
    monkeypatch.setattr(tc, "_TORCH_IDENTITY",
                        tc._TORCH_IDENTITY.replace('find_spec("torch")', 'find_spec("no_such_torch_module")'))
    with pytest.raises(ToolchainError, match="no module named 'torch'"):
        tc.probe_torch(sys.executable, tmp_path / "cache")


FAKE_CUDA_H = """
typedef int CUresult;
#define CUDAAPI
#define cuGetProcAddress cuGetProcAddress_v2
CUresult CUDAAPI cuInit(unsigned int flags);
CUresult CUDAAPI cuGetProcAddress(const char *symbol, void **pfn);
CUresult CUDAAPI cuTensorMapEncodeTiled(void *map, int rank);
typedef unsigned int cuuint32_t;
"""

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")


def slim_toolkit(root: Path) -> Path:
    """A toolkit with cuda.h and no libcuda anywhere (no driver, no lib64/stubs)."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda.h").write_text(FAKE_CUDA_H)
    return root


def needed_of(path: Path) -> list[str]:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        return [t.needed for t in ELFFile(f).get_section_by_name(".dynamic").iter_tags() if t.entry.d_tag == "DT_NEEDED"]


def link_driver_caller(tmp_path: Path, libdir: Path) -> Path:
    """A library that calls cuTensorMapEncodeTiled, linked as vLLM's _C is: -lcuda with --as-needed."""
    src = tmp_path / "caller.c"
    src.write_text("int cuTensorMapEncodeTiled(void *, int);\nint call(void) { return cuTensorMapEncodeTiled(0, 1); }\n")
    out = tmp_path / "caller.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(src), f"-L{libdir}", "-Wl,--as-needed", "-lcuda", "-o", str(out)],
                   check=True, capture_output=True)
    return out


@needs_cc
def test_driver_api_names_are_the_linked_names(tmp_path):
    names = toolchain.driver_api_names(slim_toolkit(tmp_path / "cuda"), "cc")
    assert names == ["cuGetProcAddress_v2", "cuInit", "cuTensorMapEncodeTiled"]   # the #define applied
    with pytest.raises(ToolchainError, match=r"cuda.h not found"):
        toolchain.driver_api_names(tmp_path / "nothing", "cc")


@needs_cc
def test_a_library_linked_with_as_needed_against_the_stub_names_libcuda(tmp_path):
    cuda = slim_toolkit(tmp_path / "cuda")
    stub = toolchain.libcuda_stub(cuda, tmp_path / "stubs")
    assert needed_of(link_driver_caller(tmp_path, stub.parent)).count("libcuda.so.1") == 1
    # an empty stub (what this function built before) is dropped by --as-needed: the defect
    empty = tmp_path / "empty"
    empty.mkdir()
    subprocess.run(["cc", "-shared", "-x", "c", "/dev/null", "-Wl,-soname,libcuda.so.1", "-o", str(empty / "libcuda.so")],
                   check=True)
    (tmp_path / "old").mkdir()
    assert "libcuda.so.1" not in needed_of(link_driver_caller(tmp_path / "old", empty))


@needs_cc
def test_the_stub_is_rebuilt_when_the_header_changes_and_kept_otherwise(tmp_path):
    cuda = slim_toolkit(tmp_path / "cuda")
    stub = toolchain.libcuda_stub(cuda, tmp_path / "stubs")
    first = stub.stat().st_mtime_ns
    assert toolchain.libcuda_stub(cuda, tmp_path / "stubs").stat().st_mtime_ns == first
    (cuda / "include" / "cuda.h").write_text(FAKE_CUDA_H + "CUresult CUDAAPI cuLaunchKernel(void *f);\n")
    toolchain.libcuda_stub(cuda, tmp_path / "stubs")
    assert "cuLaunchKernel" in (tmp_path / "stubs" / "libcuda.stub.c").read_text()
    assert [p.name for p in (tmp_path / "stubs").iterdir() if p.name.startswith(".")] == []   # no temporaries
    # a toolkit with its own stubs gets none of ours
    (cuda / "lib64" / "stubs").mkdir(parents=True)
    (cuda / "lib64" / "stubs" / "libcuda.so").write_bytes(b"")
    assert toolchain.libcuda_stub(cuda, tmp_path / "other") is None

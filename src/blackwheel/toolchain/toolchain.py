"""Toolchain: find CUDA 13, the host compiler, and the build Python's torch; check them early.

CUDA is found in this order: ``CUDA_HOME`` / ``CUDA_PATH``; the real location of the ``nvcc`` on
PATH (following symlinks and wrapper scripts that ``exec`` another nvcc); ``/usr/local/cuda``.
A minimal system toolkit lacks cuBLAS & co. headers: those come from the ``nvidia-*`` wheels that a
CUDA torch pulls in (``site-packages/nvidia/cu13/include``), added to ``CPATH``.
Nothing here assumes x86_64: paths and platform tags come from the machine (GB10 hosts are aarch64).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..core.errors import ToolchainError
from ..core.fsutil import atomic_write_json
from . import machine

REQUIRED_CUDA_MAJOR = machine.CUDA_MAJOR


def find_cuda_home(env: dict | None = None) -> tuple[Path, str]:
    """(CUDA home, how it was found); raises ToolchainError if there is none."""
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            home = Path(env[var])
            if (home / "bin" / "nvcc").exists():
                return home, f"${var}"
            raise ToolchainError(f"${var}={home} has no bin/nvcc; point it at a CUDA 13 toolkit")
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path:
        real = machine.resolve_nvcc(Path(on_path))
        # a wrapper script we could not follow is not a toolkit: its folder's parent has no CUDA
        if real.parent.name == "bin" and not machine.is_unfollowed_wrapper(real):
            how = "nvcc on PATH" + (f" (wrapper {on_path} -> {real})" if real != Path(on_path) else "")
            return real.parent.parent, how
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        return default, "/usr/local/cuda"
    raise ToolchainError("no nvcc found: install the CUDA 13 toolkit or set CUDA_HOME")


def nvcc_version(cuda_home: Path) -> str:
    version = machine.parse_nvcc_version(machine.output([str(cuda_home / "bin" / "nvcc"), "--version"]))
    if version is None:
        raise ToolchainError(f"cannot read the version of {cuda_home}/bin/nvcc")
    return ".".join(map(str, version))


def host_compiler(env: dict | None = None) -> tuple[str, str]:
    """(name, version) of the C++ compiler a build will use (CXX, else c++ / g++)."""
    env = os.environ if env is None else env
    cxx = (env.get("CXX") or "c++").split()[-1]
    parsed = machine.parse_compiler_version(machine.compiler_banner(cxx))
    if parsed is None:
        raise ToolchainError(f"cannot read the version of host compiler {cxx!r}")
    return parsed[0], ".".join(map(str, parsed[1]))


_TORCH_PROBE = machine.TORCH_SCRIPT   # the one torch probe (doctor runs it too)


# What identifies a torch install without importing it (importing takes seconds): the interpreter,
# and the size and mtime of torch's version file and compiled core (a reinstall changes them).
_TORCH_IDENTITY = """
import importlib.util, json, os, sys
spec = importlib.util.find_spec("torch")
root = os.path.dirname(spec.origin) if spec and spec.origin else None
files = sorted(f for f in os.listdir(root) if f == "version.py" or f.startswith("_C.")) if root else []
print(json.dumps([os.path.realpath(sys.executable), sys.version, root,
                  [(f, os.stat(os.path.join(root, f)).st_size, os.stat(os.path.join(root, f)).st_mtime_ns) for f in files]]))
"""


def _run_probe(python: str, script: str) -> str:
    proc = subprocess.run([python, "-c", script], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolchainError(f"the build Python {python} cannot import torch: {last}")
    return proc.stdout.strip().splitlines()[-1]


def probe_torch(python: str, cache_dir: Path | None = None) -> dict:
    """torch's version, CUDA, ABI and arch list as ``python`` sees them.

    With ``cache_dir`` the answer is kept per torch install, so that a rebuild that only finds its
    wheel again (nothing changed) does not spend seconds importing torch."""
    if cache_dir is None:
        return json.loads(_run_probe(python, _TORCH_PROBE))
    identity = _run_probe(python, _TORCH_IDENTITY)
    if json.loads(identity)[2] is None:
        raise ToolchainError(f"the build Python {python} cannot import torch: no module named 'torch'")
    cached = Path(cache_dir) / "toolchain" / f"torch-{hashlib.sha256(identity.encode()).hexdigest()[:24]}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        found = json.loads(_run_probe(python, _TORCH_PROBE))
        atomic_write_json(cached, found)
        return found


def nvidia_wheel_dirs(purelib: str) -> tuple[list[str], list[str]]:
    """include and lib folders of the nvidia-* wheels (headers a minimal toolkit lacks)."""
    root = Path(purelib) / "nvidia"
    inc = sorted(str(p) for p in root.glob("*/include") if p.is_dir())
    lib = sorted(str(p) for p in root.glob("*/lib") if p.is_dir())
    return inc, lib


@dataclass(frozen=True)
class Toolchain:
    cuda_home: str
    cuda_found_by: str
    nvcc: str
    host_compiler: str
    host_compiler_version: str
    torch: str
    torch_cuda: str | None
    cxx11_abi: bool
    torch_arch_list: list[str]
    python: str
    python_exe: str
    platform: str
    machine: str
    cmake: str | None
    ninja: str | None
    extra_include: list[str] = field(default_factory=list)

    @property
    def cuda_major(self) -> int:
        return int(self.nvcc.split(".")[0])

    def identity(self) -> dict:
        """What goes into the build key: anything that changes the produced binaries."""
        return {k: v for k, v in asdict(self).items() if k not in ("cuda_found_by", "python_exe")}

    def to_dict(self) -> dict:
        return asdict(self)


def probe(python: str, env: dict | None = None, cache_dir: Path | None = None) -> Toolchain:
    """This build host's toolchain; ``cache_dir`` keeps the torch part per torch install."""
    env = dict(os.environ if env is None else env)
    home, how = find_cuda_home(env)
    cc_name, cc_version = host_compiler(env)
    t = probe_torch(python, cache_dir)
    # only a minimal toolkit needs the wheels' headers; a full one must not be shadowed
    inc = [] if (home / "include" / "cublas_v2.h").exists() else nvidia_wheel_dirs(t["purelib"])[0]
    return Toolchain(
        cuda_home=str(home), cuda_found_by=how, nvcc=nvcc_version(home),
        host_compiler=cc_name, host_compiler_version=cc_version,
        torch=t["torch"], torch_cuda=t["torch_cuda"], cxx11_abi=t["cxx11_abi"],
        torch_arch_list=t["arch_list"], python=t["python"], python_exe=python,
        platform=t["platform"], machine=platform.machine(),
        cmake=_version_of(["cmake", "--version"]), ninja=_version_of(["ninja", "--version"]),
        extra_include=inc,
    )


def check(tc: Toolchain, stack_torch: str, gcc: SpecifierSet | None, package: str) -> None:
    """Every early refusal, one line each, before anything is fetched or compiled."""
    if tc.cuda_major != REQUIRED_CUDA_MAJOR:
        raise ToolchainError(f"nvcc {tc.nvcc} at {tc.cuda_home} is CUDA {tc.cuda_major}; blackwheel builds "
                             f"with CUDA {REQUIRED_CUDA_MAJOR} (set CUDA_HOME)")
    if Version(tc.torch).base_version != Version(stack_torch).base_version:
        raise ToolchainError(f"the build Python has torch {tc.torch}; the stack pins {stack_torch} "
                             f"(use the nox session's venv, or a Python with that torch)")
    if tc.torch_cuda is None or int(tc.torch_cuda.split(".")[0]) != REQUIRED_CUDA_MAJOR:
        raise ToolchainError(f"torch {tc.torch} is built for CUDA {tc.torch_cuda}; a cu13x torch is needed")
    if gcc is not None and tc.host_compiler == "gcc" and Version(tc.host_compiler_version) not in gcc:
        raise ToolchainError(f"{package} needs GCC {gcc}; the host compiler is GCC "
                             f"{tc.host_compiler_version} (set CXX/CC to a newer one)")


DRIVER_FUNCTION = re.compile(r"\b(cu[A-Z]\w*)\s*\(")


def driver_api_names(cuda_home: Path, cc: str = "cc") -> list[str]:
    """Every CUDA driver API function ``cuda.h`` declares, under the names it links by (the
    header's ``#define cuX cuX_v2`` applied: the preprocessor's output is read, not the text)."""
    header = Path(cuda_home) / "include" / "cuda.h"
    if not header.is_file():
        raise ToolchainError(f"{header} not found: a CUDA toolkit's headers are needed to build against it")
    proc = subprocess.run([cc, "-E", "-P", "-x", "c", f"-I{header.parent}", "-"], input="#include <cuda.h>\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"cannot preprocess {header} with {cc}: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(set(DRIVER_FUNCTION.findall(proc.stdout)))


def libcuda_stub(cuda_home: Path, where: Path, cxx: str = "c++") -> Path | None:
    """A ``libcuda.so`` to link against on a build host without a driver or the toolkit's stubs
    (a slim CUDA image); None when the toolkit has its own.

    Like the toolkit's own stub it defines every driver function ``cuda.h`` declares, under the
    driver's soname. An empty library is not enough: a link with ``--as-needed`` (torch's
    extensions and vLLM's ``_C`` link so) drops a library that defines none of the symbols used,
    and the result, lacking ``libcuda.so.1`` in NEEDED, fails to load with ``undefined symbol:
    cuTensorMapEncodeTiled`` (``verify`` names such a library). Rebuilt when the header changes."""
    if any((Path(cuda_home) / p).exists() for p in ("lib64/stubs/libcuda.so", "lib64/libcuda.so")):
        return None
    cc = "cc" if shutil.which("cc") else cxx
    source = "".join(f"void {name}(void) {{}}\n" for name in driver_api_names(cuda_home, cc))
    stub, recorded = Path(where) / "libcuda.so", Path(where) / "libcuda.stub.c"
    if stub.exists() and recorded.is_file() and recorded.read_text() == source:
        return stub.resolve()
    stub.parent.mkdir(parents=True, exist_ok=True)
    tmp_src, tmp_so = stub.with_name(f".libcuda.{os.getpid()}.c"), stub.with_name(f".libcuda.{os.getpid()}.so")
    tmp_src.write_text(source)
    cmd = [cc, "-shared", "-fPIC", "-x", "c", str(tmp_src), "-Wl,-soname,libcuda.so.1", "-o", str(tmp_so)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        tmp_src.unlink(missing_ok=True)
        raise ToolchainError(f"cannot build a libcuda stub with {cc}: is a host C compiler installed?")
    os.replace(tmp_so, stub)
    os.replace(tmp_src, recorded)
    return stub.resolve()


def build_env(tc: Toolchain, base: dict | None = None) -> dict[str, str]:
    """Environment every build runs in: the found CUDA first on PATH, wheel headers on CPATH."""
    env = dict(os.environ if base is None else base)
    env["CUDA_HOME"] = tc.cuda_home
    env["PATH"] = os.pathsep.join([str(Path(tc.cuda_home) / "bin"), env.get("PATH", "")])
    cpath = [p for p in env.get("CPATH", "").split(os.pathsep) if p] + tc.extra_include
    if cpath:
        env["CPATH"] = os.pathsep.join(dict.fromkeys(cpath))
    return env


def _version_of(cmd: list[str]) -> str | None:
    out = machine.output(cmd)
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else None

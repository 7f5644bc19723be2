"""Real CUDA objects for tests: a tiny kernel compiled with nvcc 13 for each arch flavour, once per
session (all builds run in parallel on first use), and cuobjdump's view of them for cross-checks.

Plain helper functions (no fixtures), so test modules share one build through ``build_all``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNEL = """
#ifndef KERNEL_NAME
#define KERNEL_NAME axpy
#endif
__global__ void KERNEL_NAME(float a, const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += a * x[i];
}
"""


def _gencode(arch: str, code: str) -> list[str]:
    return ["-gencode", f"arch={arch},code={code}"]


# name -> (output suffix, nvcc flags). "-c" objects are fast; ".so" builds link a shared object.
BUILDS: dict[str, tuple[str, list[str]]] = {
    "sm90a": (".o", _gencode("compute_90a", "sm_90a")),
    "sm120": (".o", _gencode("compute_120", "sm_120")),
    "sm120a": (".o", _gencode("compute_120a", "sm_120a")),
    "sm121": (".o", _gencode("compute_121", "sm_121")),
    "sm121a": (".o", _gencode("compute_121a", "sm_121a")),
    "family120f": (".o", _gencode("compute_120f", "[sm_120f,compute_120f]")),
    "ptx120": (".o", _gencode("compute_120", "compute_120")),
    "rdc121a": (".o", ["-rdc=true", *_gencode("compute_121a", "sm_121a")]),
    "lib_sm120": (".so", _gencode("compute_120", "sm_120")),
    "lib_sm121a": (".so", _gencode("compute_121a", "sm_121a")),
    "lib_multi": (".so", [*_gencode("compute_90a", "sm_90a"), *_gencode("compute_120", "[sm_120,compute_120]"),
                          *_gencode("compute_120a", "sm_120a"), *_gencode("compute_121a", "sm_121a")]),
    "lib_zstd": (".so", ["-compress-mode=size", *_gencode("compute_120a", "[sm_120a,compute_120a]")]),
    "lib_lz4": (".so", ["-compress-mode=speed", *_gencode("compute_121", "[sm_121,compute_121]")]),
    "unit90a": (".o", ["-DKERNEL_NAME=scale", *_gencode("compute_90a", "sm_90a")]),
}
# Linked after BUILDS (ld -r): one object with two compilation units, 12.0 and 9.0a-only.
MIXED = ("sm120", "unit90a")

_BUILT: dict[str, Path] = {}


def find_nvcc() -> str | None:
    """The real CUDA 13 nvcc: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, else nvcc on PATH."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(Path(home, "bin", "nvcc"), os.X_OK):
            return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _compile(nvcc: str, folder: Path, name: str) -> Path:
    suffix, flags = BUILDS[name]
    out = folder / f"{name}{suffix}"
    mode = ["-c"] if suffix == ".o" else ["-shared", "-Xcompiler", "-fPIC"]
    subprocess.run([nvcc, *mode, *flags, str(folder / "kernel.cu"), "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def build_all(folder: Path) -> dict[str, Path]:
    """Compile every entry of BUILDS into ``folder`` (once per process); name -> path."""
    if _BUILT:
        return _BUILT
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kernel.cu").write_text(KERNEL)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        paths = dict(zip(BUILDS, pool.map(lambda n: _compile(nvcc, folder, n), BUILDS)))
    paths["mixed"] = folder / "mixed.o"
    subprocess.run(["ld", "-r", *(str(paths[n]) for n in MIXED), "-o", str(paths["mixed"])],
                   check=True, capture_output=True, text=True)
    _BUILT.update(paths)
    return _BUILT


# ---- cuobjdump (from the nvidia-cuda-cuobjdump wheel) -------------------------------------------------
def find_cuobjdump() -> tuple[str | None, str]:
    """(path, version of the wheel) or (None, why not)."""
    try:
        dist = importlib.metadata.distribution("nvidia-cuda-cuobjdump")
    except importlib.metadata.PackageNotFoundError:
        return None, "the nvidia-cuda-cuobjdump wheel is not installed (pip install 'nvidia-cuda-cuobjdump>=13.2')"
    for file in dist.files or ():
        if file.name == "cuobjdump":
            return str(dist.locate_file(file)), dist.version
    return None, f"nvidia-cuda-cuobjdump {dist.version} has no cuobjdump binary"


_LISTING = re.compile(r"^(ELF|PTX) file\s+\d+:\s+\S*?\.(sm_\d+[af]?)\.(?:cubin|ptx)\s*$", re.MULTILINE)


def cuobjdump_archs(cuobjdump: str, path: Path) -> tuple[set[str], set[str]]:
    """({'sm_120a', ...} cubins, {...} PTX) as ``cuobjdump --list-elf --list-ptx`` names them."""
    done = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True)
    cubins, ptx = set(), set()
    for kind, arch in _LISTING.findall(done.stdout):
        (cubins if kind == "ELF" else ptx).add(arch)
    return cubins, ptx

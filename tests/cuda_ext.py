"""A small CUDA torch extension, generated as a real sdist with a recipe, a patch and a stack.

The end-to-end tests drive the whole pipeline (fetch from a mirror, hash check, patch, nvcc build,
retag, verify, wheelhouse) on it: it builds in a minute on two cores, where flash-attn takes hours.
``light=True`` gives the same package without torch's headers in its units (a plain CPython module
and a kernel): a cold build in seconds of compile, for the fault tests that build it many times.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from blackwheel.core.fsutil import sha256_file

NAME, VERSION = "bw-saxpy", "0.1.0"

_SETUP = '''
import os
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

SCALE = "2.0"  # patched by 0001 to 3.0

setup(
    name="bw-saxpy", version="0.1.0", packages=["bw_saxpy"],
    ext_modules=[CUDAExtension("bw_saxpy._C", ["csrc/saxpy.cu"],
                               extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2", "-DSCALE=" + SCALE]})],
    cmdclass={"build_ext": BuildExtension},
)
'''

_KERNEL = '''
#include <torch/extension.h>

__global__ void saxpy_kernel(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = SCALE * x[i] + y[i];
}

torch::Tensor saxpy(torch::Tensor x, torch::Tensor y) {
  int n = x.numel();
  saxpy_kernel<<<(n + 255) / 256, 256>>>(x.data_ptr<float>(), y.data_ptr<float>(), n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("saxpy", &saxpy); }
'''

# light: the same setup.py lines the patch touches, units without torch's headers, linked
# --as-needed so that the module does not link torch's libraries either (recipe: no links-torch)
_LIGHT_SOURCES = ('["csrc/saxpy.cu"],', '["csrc/module.cpp", "csrc/saxpy.cu"], extra_link_args=["-Wl,--as-needed"],')
_LIGHT_KERNEL = '''
__global__ void saxpy_kernel(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = SCALE * x[i] + y[i];
}
void saxpy(const float* x, float* y, int n) { saxpy_kernel<<<(n + 255) / 256, 256>>>(x, y, n); }
'''
_LIGHT_MODULE = '''
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mod); }
'''

_PATCH = '''From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: blackwheel tests <tests@blackwheel.invalid>
Date: Wed, 25 Nov 2026 00:00:00 +0000
Subject: [PATCH] setup.py: scale by 3

Why: proves that the pipeline applies a recipe's patches before the build.
Upstream: none (test fixture)
Applies-when: always
---
 setup.py | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/setup.py b/setup.py
--- a/setup.py
+++ b/setup.py
@@ -4,7 +4,7 @@ import os
 from setuptools import setup
 from torch.utils.cpp_extension import BuildExtension, CUDAExtension
 
-SCALE = "2.0"  # patched by 0001 to 3.0
+SCALE = "3.0"  # patched by 0001 to 3.0
 
 setup(
     name="bw-saxpy", version="0.1.0", packages=["bw_saxpy"],
'''


@dataclass
class TestProject:
    recipes: Path
    patches: Path
    mirror: Path
    sdist: Path
    sha256: str


def make_sdist(where: Path, light: bool = False) -> Path:
    root = where / f"bw_saxpy-{VERSION}"
    (root / "csrc").mkdir(parents=True)
    (root / "bw_saxpy").mkdir()
    (root / "setup.py").write_text(_SETUP.lstrip("\n").replace(*_LIGHT_SOURCES) if light else _SETUP.lstrip("\n"))
    (root / "csrc" / "saxpy.cu").write_text(_LIGHT_KERNEL if light else _KERNEL)
    if light:
        (root / "csrc" / "module.cpp").write_text(_LIGHT_MODULE)
    (root / "bw_saxpy" / "__init__.py").write_text("from . import _C\n")
    (root / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
                                   "Requires-Dist: torch\n")
    sdist = where / f"bw_saxpy-{VERSION}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    shutil.rmtree(root)
    return sdist


def recipe_text(sha256: str, archs: dict[str, list[str]] | None = None, links_torch: bool = True) -> str:
    archs = archs or {"gb10": ["12.1"], "sm120": ["12.0"], "blackwell": ["12.0", "12.1"],
                      "hopper": ["9.0"]}
    targets = ", ".join(f'{t} = {list(v)!r}'.replace("'", '"') for t, v in archs.items())
    return textwrap.dedent(f'''
        [package]
        name = "{NAME}"
        import-name = "bw_saxpy"
        builder = "pip-wheel"
        links-torch = {str(links_torch).lower()}

        [[versions]]
        version = "{VERSION}"
        sdist = {{ pypi = "{NAME}", sha256 = "{sha256}" }}

          [[versions.patches]]
          file = "0001-scale-by-3.patch"

        [arch]
        knob = "TORCH_CUDA_ARCH_LIST"
        style = "dotted"
        separator = ";"
        targets = {{ {targets} }}

        [expect]
        cuda-libraries = ["_C*.so"]
        compile-units = 1
        unit-memory-gib = 1.5
    ''')


def torch_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out.split("+")[0]


def make_project(where: Path, python: str, archs: dict[str, list[str]] | None = None,
                 light: bool = False) -> TestProject:
    """recipes/ (recipe + stack pinning the given Python's torch), patches/, mirror/pypi/<sdist>."""
    mirror = where / "mirror" / "pypi"
    mirror.mkdir(parents=True)
    sdist = make_sdist(mirror, light)
    sha = sha256_file(sdist)
    recipes = where / "recipes"
    (recipes / "stacks").mkdir(parents=True)
    (recipes / f"{NAME}.toml").write_text(recipe_text(sha, archs, links_torch=not light))
    (recipes / "stacks" / "test.toml").write_text(
        f'name = "test"\ncuda = "13.0"\ndefault = true\n[pins]\ntorch = "{torch_version(python)}"\n'
        f'"{NAME}" = "{VERSION}"\n')
    patches = where / "patches" / NAME / VERSION
    patches.mkdir(parents=True)
    (patches / "0001-scale-by-3.patch").write_text(_PATCH)
    return TestProject(recipes, where / "patches", where / "mirror", sdist, sha)

"""pip-wheel: ``pip wheel --no-build-isolation`` of the patched tree (torch's BuildExtension + ninja)."""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import Callable

from ..core.errors import BuildFailed
from ..toolchain.progress import RunResult, run_logged
from ..toolchain.toolchain import Toolchain
from .base import BuildRequest, Built, Prepared

# blackwheel plan: a ninja stand-in that keeps the generated build file and compiles nothing
_PLAN_NINJA = """#!/bin/sh
# blackwheel plan: keep the generated build file, compile nothing
case "$1" in --version) exec {real} --version ;; esac
# CMake's own compiler checks (try_compile) build in CMakeFiles/: let them really build
case "$PWD" in */CMakeFiles/*) exec {real} "$@" ;; esac
pwd > "$BLACKWHEEL_PLAN_OUT.dir"
cp build.ninja "$BLACKWHEEL_PLAN_OUT" && exit 97
"""
# torch's build.ninja: "cuda_compile" / "compile"; CMake's: "CUDA_COMPILER__<target>_..."
_UNIT = re.compile(r"^build \S+\.o: (?:(?:cuda_)?compile|(?:CUDA|CXX)_COMPILER__\w+) ", re.MULTILINE)


def pip_wheel_command(req: BuildRequest, tree: Path, out: Path) -> list[str]:
    return [req.python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
            "-v", "-w", str(out), str(tree)]


def run_pip_wheel(req: BuildRequest, tree: Path, env: dict[str, str], out: Path, log: Path) -> RunResult:
    return run_logged(pip_wheel_command(req, tree, out), tree, env, log, req.label,
                      req.recipe.expect.get("compile-units"), req.live)


def generate_build_file(req: BuildRequest, tree: Path, env: dict[str, str], out: Path, log: Path):
    """Run the package's build with a ninja stand-in that keeps build.ninja and compiles nothing.

    Returns (build file text or None, RunResult); the real build tree is left in ``tree``."""
    shim = log.parent / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    real = shutil.which("ninja", path=env["PATH"]) or "ninja"
    (shim / "ninja").write_text(_PLAN_NINJA.format(real=real))
    (shim / "ninja").chmod(stat.S_IRWXU)
    env = {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", "BLACKWHEEL_PLAN_OUT": str(out)}
    out.unlink(missing_ok=True)
    result = run_pip_wheel(req, tree, env, log.parent / "dist", log)
    return (out.read_text() if out.is_file() else None), result


def gencode_flags(build_file: str) -> list[str]:
    """The distinct ``-gencode`` flags of a torch-extension build.ninja."""
    return sorted(set(m.replace("=", " ", 1) if m.startswith("-gencode=") else m
                      for m in re.findall(r"-gencode[= ]arch=\S+", build_file)))


class PipWheel:
    name = "pip-wheel"

    def key(self, req: BuildRequest) -> dict:
        return {}

    def environment(self, req: BuildRequest, toolchain: Toolchain, base: dict[str, str],
                    env: dict[str, str]) -> dict[str, str]:
        return env

    def plan(self, req: BuildRequest, out: Path, prepare: Callable[[], Prepared]) -> dict:
        """The generated build file's arch flags and compile units."""
        return self.plan_data(req, out, prepare())

    def plan_data(self, req: BuildRequest, out: Path, prepared: Prepared) -> dict:
        text, result = generate_build_file(req, prepared.tree, prepared.env, out, prepared.work / "plan.log")
        if text is None:
            raise BuildFailed(f"{req.recipe.name}: no build file was generated: "
                              f"{result.first_error or 'see'} (log: {prepared.work / 'plan.log'})")
        knob = req.recipe.arch.knob
        return {"package": req.recipe.name, "target": req.target.name, "knob": knob,
                "value": prepared.env[knob], "gencode": gencode_flags(text), "units": len(_UNIT.findall(text)),
                "build_file": str(out)}

    def build(self, req: BuildRequest, tree: Path, env: dict[str, str], out: Path, log: Path) -> Built:
        return Built(run_pip_wheel(req, tree, env, out, log))

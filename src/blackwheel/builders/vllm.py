"""vLLM's build plan without building: run CMake configure only and read what it decided.

vLLM's CMakeLists.txt intersects TORCH_CUDA_ARCH_LIST with each kernel family's own arch list and
prints one line per family ("Building scaled_mm_c3x_sm120 for archs: 12.1a", "Not building
W4A8 kernels as no compatible archs ..."). Those lines, read back into a table, say before hours
of compiling whether a target gets native code for the families a recipe requires; when CMake also
generates, build.ninja gives the -gencode flags each library's objects really get.

The configure mirrors setup.py's cmake call (``cmake_build_ext.configure`` in vLLM's setup.py),
plus ``FETCHCONTENT_FULLY_DISCONNECTED=ON``: every external project must come through its
``*_SRC_DIR`` override, so nothing can be downloaded.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..core.errors import ToolchainError, VerifyFailed
from ..core.fsutil import atomic_write_text
from ..core.targets import CudaArch, Target, covers
from ..toolchain.toolchain import Toolchain, libcuda_stub
from .base import BuildRequest, Prepared
from .pip_wheel import PipWheel

# ---- the configure command ------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigureSpec:
    """Everything one configure needs; ``resource_dirs`` maps override variables to source trees."""

    source_dir: Path
    build_dir: Path
    python: str
    arch_list: str                               # TORCH_CUDA_ARCH_LIST, e.g. "12.0f;12.1a"
    resource_dirs: dict[str, Path] = field(default_factory=dict)
    cuda_home: Path = Path("/usr/local/cuda")
    build_type: str = "Release"
    extra_cmake_args: tuple[str, ...] = ()
    cmake: str = "cmake"                         # find_cmake(): vLLM needs >= 3.26


def configure_command(spec: ConfigureSpec) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` for ``cmake -S src -B build``: setup.py's variables, downloads impossible."""
    argv = [
        spec.cmake, "-S", str(spec.source_dir), "-B", str(spec.build_dir), "-G", "Ninja",
        f"-DCMAKE_BUILD_TYPE={spec.build_type}",
        "-DVLLM_TARGET_DEVICE=cuda",
        f"-DVLLM_PYTHON_EXECUTABLE={spec.python}",
        f"-DFETCHCONTENT_BASE_DIR={spec.build_dir / '_deps'}",
        "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
        f"-DCMAKE_CUDA_COMPILER={spec.cuda_home / 'bin' / 'nvcc'}",
        *spec.extra_cmake_args,
    ]
    env = dict(os.environ)
    env.update({k: str(v) for k, v in spec.resource_dirs.items()})
    env["TORCH_CUDA_ARCH_LIST"] = spec.arch_list
    env["CUDA_HOME"] = str(spec.cuda_home)
    # nvcc, and the build environment's own tools (ninja, cmake) ahead of the system's
    tools = Path(spec.python).parent
    env["PATH"] = os.pathsep.join([str(spec.cuda_home / "bin"), str(tools), env.get("PATH", "")])
    return argv, env


CMAKE_MIN = (3, 26)                              # vLLM's cmake_minimum_required


def find_cmake(python: str) -> str:
    """A CMake new enough for vLLM: the build environment's (pip's ``cmake``), else PATH's."""
    seen = []
    for cand in (str(Path(python).parent / "cmake"), shutil.which("cmake")):
        if not cand or not Path(cand).exists():
            continue
        out = subprocess.run([cand, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"version (\d+)\.(\d+)\S*", out)
        if m and (int(m.group(1)), int(m.group(2))) >= CMAKE_MIN:
            return cand
        seen.append(f"{m.group(0) if m else 'unknown version'} at {cand}")
    raise ToolchainError(f"vLLM needs CMake >= {'.'.join(map(str, CMAKE_MIN))} (found: "
                         f"{'; '.join(seen) or 'none'}): pip install 'cmake>=3.26' into the build env")


def require_gcc(package: str, version: str, needed: SpecifierSet | None, found: Version | None) -> None:
    """Refuse, before any CMake runs, a host GCC that the package version's CMake will reject."""
    if needed is None or found is None or found in needed:
        return
    raise ToolchainError(
        f"{package} {version} needs GCC {needed} (its CMakeLists.txt refuses older); found {found}: "
        f"install a newer gcc/g++ and point CC, CXX and CUDAHOSTCXX at it")


def plan_only_cmake_args(cuda_home: Path, python: str) -> list[str]:
    """Library hints that let a GPU-less host without full toolkit libraries *generate*.

    Configure looks for libcuda (CUDA::cuda_driver) and libnvrtc; on a host with no driver and
    no toolkit stubs it finds neither and generation fails, although every arch decision has
    been made. A plan never links, so naming where they would be is enough; a real build needs
    the real libraries (driver, or the toolkit's lib64/stubs).
    """
    args = []
    if not _found_lib("libcuda.so", cuda_home):
        args.append(f"-DCUDA_cuda_driver_LIBRARY=/usr/lib/{_multiarch()}/libcuda.so")
    if not _found_lib("libnvrtc.so", cuda_home):
        wheel_lib = _torch_nvidia_lib(python, "libnvrtc.so.13")
        if wheel_lib:
            args.append(f"-DCUDA_nvrtc_LIBRARY={wheel_lib}")
    return args


def toolkit_library_hints(cuda_home: Path, python: str, stub_dir: Path, cxx: str = "c++") -> list[str]:
    """CMake hints for a real build on a slim toolkit without a driver: libnvrtc from the torch
    wheel's nvidia dependencies when the toolkit has none (the same library, so linking is sound),
    and an empty libcuda stub (``toolchain.libcuda_stub``) when neither driver nor stubs are there."""
    hints = []
    if not _found_lib("libnvrtc.so", cuda_home):
        wheel_lib = _torch_nvidia_lib(python, "libnvrtc.so.13")
        hints += [f"-DCUDA_nvrtc_LIBRARY={wheel_lib}"] if wheel_lib else []
    if not _found_lib("libcuda.so", cuda_home):
        stub = libcuda_stub(cuda_home, stub_dir, cxx)
        hints += [f"-DCUDA_cuda_driver_LIBRARY={stub}"] if stub else []
    return hints


def toolkit_link_env(cuda_home: Path, python: str, link_dir: Path, base: dict[str, str]) -> dict[str, str]:
    """``LIBRARY_PATH`` for builds that link by ``-lnvrtc`` outside CMake (vLLM's DeepGEMM step,
    tools/build_deepgemm_C.py): on a slim toolkit without libnvrtc, an unversioned ``libnvrtc.so``
    link in ``link_dir`` to the torch wheel's ``libnvrtc.so.13``. Empty when the toolkit has it."""
    if _found_lib("libnvrtc.so", cuda_home):
        return {}
    wheel_lib = _torch_nvidia_lib(python, "libnvrtc.so.13")
    if not wheel_lib:
        return {}
    link = Path(link_dir) / "libnvrtc.so"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists() or link.resolve() != Path(wheel_lib).resolve():
        tmp = link.with_name(f".libnvrtc.so.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(wheel_lib)
        os.replace(tmp, link)
    paths = [str(link.parent.resolve()), *(p for p in base.get("LIBRARY_PATH", "").split(os.pathsep) if p)]
    return {"LIBRARY_PATH": os.pathsep.join(dict.fromkeys(paths))}


def _found_lib(name: str, cuda_home: Path) -> bool:
    dirs = [cuda_home / "lib64", cuda_home / "lib64" / "stubs", Path("/usr/lib") / _multiarch(),
            Path("/usr/lib64")]
    return any((d / name).exists() for d in dirs)


def _multiarch() -> str:
    return f"{os.uname().machine}-linux-gnu"


def _torch_nvidia_lib(python: str, name: str) -> str | None:
    """The CUDA library the torch wheel's nvidia-* dependencies ship (nvidia/cu13/lib)."""
    code = ("import nvidia, pathlib; "
            f"print(next((str(p) for d in nvidia.__path__ for p in pathlib.Path(d).glob('*/lib/{name}')), ''))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() or None


@dataclass(frozen=True)
class ConfigureRun:
    argv: list[str]
    returncode: int
    seconds: float
    log: str


def run_configure(spec: ConfigureSpec, log_path: Path | None = None) -> ConfigureRun:
    argv, env = configure_command(spec)
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    log = f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}"
    if log_path is not None:
        atomic_write_text(log_path, log)
    return ConfigureRun(argv, proc.returncode, time.monotonic() - start, log)


# ---- reading the plan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyPlan:
    """One kernel family: the archs CMake chose (cubins and PTX), or why it is skipped."""

    name: str
    archs: tuple[CudaArch, ...] = ()
    ptx: tuple[CudaArch, ...] = ()
    skipped: str | None = None

    @property
    def built(self) -> bool:
        return self.skipped is None


_BUILT = [
    re.compile(r"^Building (?P<name>.+?)(?: kernels)? for archs: (?P<archs>.*)$"),
    re.compile(r"^(?P<name>DeepGEMM|FlashMLA|DeepSelect|FlashKDA) CUDA architectures: (?P<archs>.*)$"),
    re.compile(r"^(?P<name>FA[234])_ARCHS:\s*(?P<archs>.*)$"),
    re.compile(r"^Building (?P<name>hadacore)$"),
    re.compile(r"^\[(?P<name>QUTLASS)\] QuTLASS is available at "),   # a skip line may follow
]
_SKIPPED = [
    re.compile(r"^Not building (?P<name>.+?)(?: kernels)? as (?P<why>.*?)\.?$"),
    re.compile(r"^(?P<name>DeepGEMM|FlashMLA|DeepSelect|FlashKDA) will not compile: (?P<why>.*)$"),
    re.compile(r"^\[(?P<name>QUTLASS)\] Skipping build: (?P<why>.*)$"),
    re.compile(r"^(?P<name>\S+) skipped: (?P<why>.*)$"),
]
# Upstream spells some families two ways ("scaled_mm_c3x_sm100" / "scaled_mm_c3x_100").
_ALIASES = {"scaled_mm_c3x_120": "scaled_mm_c3x_sm120", "scaled_mm_c3x_100": "scaled_mm_c3x_sm100",
            "QUTLASS": "QuTLASS", "fmha_sm100": "fmha_sm100"}


def _parse_archs(text: str) -> tuple[tuple[CudaArch, ...], tuple[CudaArch, ...]]:
    cubins, ptx = [], []
    for item in re.split(r"[;\s]+", text.strip()):
        if not item:
            continue
        base = item.removesuffix("+PTX")
        arch = CudaArch.parse(base)
        cubins.append(arch)              # "8.0+PTX" is the sm_80 cubin and compute_80 PTX
        if base != item:
            ptx.append(arch)
    return tuple(cubins), tuple(ptx)


def _status_lines(text: str):
    for raw in text.splitlines():
        raw = raw.lstrip()   # pip indents what the build prints
        if raw.startswith("-- "):
            yield raw[3:].strip()


@dataclass(frozen=True)
class Plan:
    requested: tuple[CudaArch, ...]
    supported: tuple[CudaArch, ...]
    families: dict[str, FamilyPlan]
    configured: bool
    errors: tuple[str, ...] = ()

    def rows(self) -> list[tuple[str, str]]:
        """``(family, "12.1a + PTX 8.0" | "skipped: why")`` sorted by name, for a table."""
        out = []
        for name in sorted(self.families, key=str.lower):
            f = self.families[name]
            if not f.built:
                out.append((name, f"skipped: {f.skipped}"))
                continue
            parts = [";".join(a.dotted for a in f.archs)] if f.archs else []
            if f.ptx:
                parts.append("PTX " + ";".join(a.dotted for a in f.ptx))
            out.append((name, " + ".join(parts) or "built (archs not printed)"))
        return out


def parse_configure(text: str) -> Plan:
    """Read a configure log into a Plan. The last word on a family wins (FA prints twice)."""
    requested = supported = ()
    families: dict[str, FamilyPlan] = {}
    for line in _status_lines(text):
        if line.startswith("CUDA target architectures:") and not requested:
            requested = _parse_archs(line.split(":", 1)[1])[0]
        elif line.startswith("CUDA supported target architectures:") and not supported:
            supported = _parse_archs(line.split(":", 1)[1])[0]
        elif (fam := _family_from(line)) is not None:
            families[fam.name] = fam
    configured = "-- Configuring done" in text
    return Plan(requested, supported, families, configured, _errors(text))


def _errors(text: str) -> tuple[str, ...]:
    """Each ``CMake Error`` with its first line of explanation, one line each."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith("CMake Error"):
            detail = next((x.strip() for x in lines[i + 1:i + 4] if x.strip()), "")
            out.append(f"{line.strip()} {detail}".strip())
    return tuple(out)


def _family_from(line: str) -> FamilyPlan | None:
    for rx in _BUILT:
        if m := rx.match(line):
            name = _ALIASES.get(m.group("name"), m.group("name"))
            archs, ptx = _parse_archs(m.groupdict().get("archs") or "")
            if not archs and not ptx and m.groupdict().get("archs") is not None:
                return FamilyPlan(name, skipped="no arch of the target is in its list")
            return FamilyPlan(name, archs, ptx)
    for rx in _SKIPPED:
        if m := rx.match(line):
            return FamilyPlan(_ALIASES.get(m.group("name"), m.group("name")), skipped=m.group("why"))
    return None


# ---- what a target lacks --------------------------------------------------------------------------


def lacking_native(plan: Plan, required: list[str], target: Target,
                   want: tuple[CudaArch, ...] = ()) -> list[str]:
    """For each required family, why it lacks native code for a device of ``target``.

    ``want`` names cubins each family must hold as well (e.g. 12.1a for gb10, where a 12.0f
    cubin runs but lacks 12.1's arch-specific code paths).
    """
    out = []
    for name in required:
        fam = plan.families.get(name)
        if fam is None:
            out.append(f"{name}: CMake printed nothing for it (not in this vLLM version?)")
            continue
        if not fam.built:
            out.append(f"{name}: skipped ({fam.skipped})")
            continue
        got = ";".join(a.dotted for a in fam.archs) or "PTX only"
        missing = [str(cc) for cc in target.devices if covers(fam.archs, cc) is None]
        if missing:
            out.append(f"{name}: built for {got}, no cubin that runs on {', '.join(missing)}")
        absent = [a.dotted for a in want if a not in fam.archs]
        if absent and not missing:
            out.append(f"{name}: built for {got}, not {';'.join(absent)}")
    return out


def require_native(plan: Plan, required: list[str], target: Target,
                   want: tuple[CudaArch, ...] = ()) -> None:
    """Raise before building when a required kernel family would lack native code."""
    lacking = lacking_native(plan, required, target, want)
    if lacking:
        raise VerifyFailed(f"target {target.name} ({target.tag}) would lack native code: "
                           + "; ".join(lacking))


# ---- what each library's objects are compiled for (when CMake also generated) ---------------------
_NINJA_OBJ = re.compile(r"^build (?P<obj>\S*CMakeFiles/(?P<target>[^/\s]+)\.dir/\S+\.cu\.o):")
_GENCODE = re.compile(r"arch=compute_(?P<arch>\w+?),code=(?P<code>(?:sm|compute)_\w+)")


def parse_build_ninja(text: str) -> dict[str, dict[str, tuple[CudaArch, ...]]]:
    """``{cmake target: {"cubins": archs, "ptx": archs}}`` from the -gencode flags in build.ninja."""
    found: dict[str, dict[str, set[CudaArch]]] = {}
    target = None
    for line in text.splitlines():
        if m := _NINJA_OBJ.match(line):
            target = m.group("target")
            found.setdefault(target, {"cubins": set(), "ptx": set()})
        elif target and line.startswith("  FLAGS = "):
            for g in _GENCODE.finditer(line):
                kind = "cubins" if g.group("code").startswith("sm_") else "ptx"
                found[target][kind].add(CudaArch.parse(g.group("code")))
        elif not line.startswith("  "):
            target = None
    return {t: {k: tuple(sorted(v)) for k, v in d.items()} for t, d in sorted(found.items())}


def plan_build(spec: ConfigureSpec, log_path: Path | None = None) -> tuple[Plan, dict, ConfigureRun]:
    """Configure once and read it: the family table, and per-library archs when it generated."""
    run = run_configure(spec, log_path)
    plan = parse_configure(run.log)
    ninja = spec.build_dir / "build.ninja"
    libraries = parse_build_ninja(ninja.read_text()) if run.returncode == 0 and ninja.is_file() else {}
    return plan, libraries, run


# ---- the builder: pip wheel, whose setup.py configures with CMake ---------------------------------------
class Vllm(PipWheel):
    """vLLM's ``pip wheel``: its setup.py runs CMake, which needs the toolkit's libraries named on a
    slim host (``CMAKE_ARGS``), and whose configure output says, per kernel family, what a target gets."""

    name = "vllm"

    def environment(self, req: BuildRequest, toolchain: Toolchain, base: dict[str, str],
                    env: dict[str, str]) -> dict[str, str]:
        if "CMAKE_ARGS" not in req.recipe.env:
            return env
        # the recipe's first; the caller's own (CMAKE_ARGS in the environment) and the toolkit
        # hints after them, so a slim CUDA whose libnvrtc comes from the nvidia wheels still links
        hints = toolkit_library_hints(Path(toolchain.cuda_home), req.python, req.workdir / "stubs",
                                      env.get("CXX", "c++"))
        parts = (req.recipe.env["CMAKE_ARGS"], base.get("CMAKE_ARGS", ""), *hints)
        env = {**env, "CMAKE_ARGS": " ".join(a for a in parts if a)}
        return {**env, **toolkit_link_env(Path(toolchain.cuda_home), req.python, req.workdir / "stubs", env)}

    def plan_data(self, req: BuildRequest, out: Path, prepared: Prepared) -> dict:
        env = dict(prepared.env)
        if "CMAKE_ARGS" in env:   # a plan never links: a host without libcuda may still generate
            env["CMAKE_ARGS"] = " ".join([env["CMAKE_ARGS"],
                                          *plan_only_cmake_args(Path(prepared.toolchain.cuda_home), req.python)])
        data = super().plan_data(req, out, Prepared(prepared.tree, env, prepared.work, prepared.toolchain))
        # CMake prints its kernel families and their arches while it configures
        families = parse_configure((prepared.work / "plan.log").read_text(errors="replace")).rows()
        if families:
            data = {**{k: v for k, v in data.items() if k != "build_file"}, "families": dict(families),
                    "build_file": data["build_file"]}
        return data

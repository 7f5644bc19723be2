"""``blackwheel doctor``: what this machine has (GPU, driver, CUDA, compiler, torch, installed kernels)
and what will go wrong with it, each finding with its fix.

Two halves, so the analysis is tested on recorded machines (tests/fixtures/doctor/*.json):
- probes (``probe_machine``) run commands and record their raw output in a ``Probe``; they never raise;
- the analysis (``analyse``) is a pure function from a ``Probe`` to ``Finding``s.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import BlackwheelError
from ..check.inspect import ObjectReport, inspect_path
from ..core.targets import ComputeCapability, CudaArch, parse_arch_list
from ..toolchain import machine
from ..toolchain.machine import cuda_home_of, parse_compiler_version, parse_nvcc_version
from ..check.verify import best_native, compat_objects

CUDA_MAJOR = machine.CUDA_MAJOR
MIN_DRIVER_MAJOR = 580  # CUDA 13.0 needs driver >= 580 on Linux
MIN_GCC = (11, 3)  # vLLM 0.25.1's floor
# Distributions whose prebuilt kernels doctor checks against the GPU.
KERNEL_PACKAGES = ("flash-attn", "flashinfer-python", "flashinfer-jit-cache", "flashinfer-cubin", "vllm")
RECIPE_OF = {"flashinfer-python": "flashinfer", "flashinfer-jit-cache": "flashinfer"}  # dist -> recipes/*.toml
# Arch knobs read from the environment: name -> spelling of a device in the fix.
ARCH_KNOBS = {"TORCH_CUDA_ARCH_LIST": "{major}.{minor}", "FLASHINFER_CUDA_ARCH_LIST": "{major}.{minor}a",
              "FLASH_ATTN_CUDA_ARCHS": "{major}{minor}"}
ENV_KEYS = ("CUDA_HOME", "CUDA_PATH", "TRITON_PTXAS_PATH", *ARCH_KNOBS)


@dataclass(frozen=True)
class PackageProbe:
    name: str
    version: str
    objects: tuple[ObjectReport, ...] = ()


@dataclass(frozen=True)
class Probe:
    """Raw facts about one machine, as the commands printed them."""

    machine: str = ""
    nvidia_smi: str | None = None  # `nvidia-smi --query-gpu=name,compute_cap,driver_version` csv
    nvidia_smi_error: str | None = None
    nvcc_path: str | None = None  # the nvcc found on PATH
    nvcc_real: str | None = None  # after following wrapper scripts and symlinks
    nvcc_version: str | None = None  # `nvcc --version` output
    path_home_real: str | None = None  # realpath of the CUDA home torch guesses from nvcc's PATH entry
    env_home_real: str | None = None  # realpath of $CUDA_HOME (or $CUDA_PATH)
    host_compiler: str | None = None  # first line of `c++ --version`
    torch: dict = field(default_factory=dict)  # version, cuda, arch_list, cxx11_abi, available, error
    triton_version: str | None = None
    triton_ptxas_exists: bool = False
    env: dict = field(default_factory=dict)
    packages: tuple[PackageProbe, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["packages"] = [{"name": p.name, "version": p.version, "objects": [o.to_dict() for o in p.objects]}
                         for p in self.packages]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        packages = tuple(PackageProbe(p["name"], p["version"], tuple(ObjectReport.from_dict(o) for o in p["objects"]))
                         for p in d.get("packages", ()))
        return cls(**{**d, "packages": packages})


@dataclass(frozen=True)
class Gpu:
    name: str
    cc: ComputeCapability
    driver: str


@dataclass(frozen=True)
class Finding:
    severity: str  # "blocking", "warning" or "info"
    message: str
    fix: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- parsing recorded outputs (pure) ---------------------------------------------------------------------
def parse_gpus(nvidia_smi: str | None) -> list[Gpu]:
    gpus = []
    for line in (nvidia_smi or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and re.fullmatch(r"\d+\.\d", parts[1]):
            gpus.append(Gpu(parts[0], ComputeCapability.parse(parts[1]), parts[2]))
    return gpus


# ---- the analysis (pure) ---------------------------------------------------------------------------------
def device_ccs(probe: Probe) -> list[ComputeCapability]:
    return sorted({g.cc for g in parse_gpus(probe.nvidia_smi)} or
                  ({ComputeCapability.parse(probe.torch["device_cc"])} if probe.torch.get("device_cc") else set()))


def check_gpu(probe: Probe) -> list[Finding]:
    gpus = parse_gpus(probe.nvidia_smi)
    if not gpus:
        why = probe.nvidia_smi_error or "nvidia-smi printed no GPU"
        return [Finding("info", f"no GPU visible ({why}): device checks skipped")]
    findings = []
    for gpu in gpus:
        major = re.match(r"\d+", gpu.driver)
        if major and int(major.group()) < MIN_DRIVER_MAJOR:
            findings.append(Finding("blocking", f"driver {gpu.driver} is too old for CUDA {CUDA_MAJOR}",
                                    f"install an NVIDIA driver >= {MIN_DRIVER_MAJOR}"))
    return findings


def check_toolkit(probe: Probe) -> list[Finding]:
    if not probe.nvcc_path:
        return [Finding("warning", "nvcc not found on PATH: builds need CUDA 13 nvcc (running wheels does not)",
                        "install the CUDA 13 toolkit and put <cuda>/bin on PATH")]
    version = parse_nvcc_version(probe.nvcc_version)
    if version is None:
        return [Finding("warning", f"could not read the CUDA version from {probe.nvcc_real}")] + check_cuda_home(probe)
    if version[0] != CUDA_MAJOR:
        return [Finding("blocking", f"nvcc is CUDA {version[0]}.{version[1]}, blackwheel builds need CUDA {CUDA_MAJOR}",
                        f"install CUDA {CUDA_MAJOR} and export CUDA_HOME=<its folder>")] + check_cuda_home(probe)
    return check_cuda_home(probe)


def check_cuda_home(probe: Probe) -> list[Finding]:
    """torch's cpp_extension takes $CUDA_HOME, else the folder above `which nvcc`: a wrapper misleads it."""
    real_home = cuda_home_of(probe.nvcc_real)
    env_home = probe.env.get("CUDA_HOME") or probe.env.get("CUDA_PATH")
    guessed = cuda_home_of(probe.nvcc_path)
    if not env_home and (probe.path_home_real or guessed) != real_home:
        return [Finding("blocking", f"{probe.nvcc_path} leads to {probe.nvcc_real} (a wrapper or link): "
                        f"without CUDA_HOME, torch builds look for CUDA in {guessed}", f"export CUDA_HOME={real_home}")]
    if env_home and (probe.env_home_real or env_home) != real_home:
        return [Finding("warning", f"CUDA_HOME={env_home} but nvcc on PATH is {probe.nvcc_real} "
                        f"(CUDA home {real_home}): two toolkits mix", f"export CUDA_HOME={real_home} or fix PATH")]
    return []


def check_host_compiler(probe: Probe) -> list[Finding]:
    parsed = parse_compiler_version(probe.host_compiler)
    if parsed is None:
        return [Finding("warning", "no host C++ compiler found (c++ --version)", "install g++ >= 11.3")]
    kind, version = parsed
    if kind == "gcc" and version[:2] < MIN_GCC:
        return [Finding("warning", f"g++ {'.'.join(map(str, version))} is older than vLLM's floor "
                        f"{MIN_GCC[0]}.{MIN_GCC[1]}", "install g++ >= 11.3 (>= 13 for vLLM 0.33) and export CXX")]
    return []


def _torch_archs(torch: dict) -> tuple[list[CudaArch], list[CudaArch]]:
    cubins, ptx = [], []
    for item in torch.get("arch_list") or ():
        (ptx if item.startswith("compute_") else cubins).append(CudaArch.parse(item))
    return cubins, ptx


def check_torch(probe: Probe, ccs: list[ComputeCapability]) -> list[Finding]:
    torch = probe.torch
    if not torch.get("version"):
        return [Finding("warning", f"torch is not importable ({torch.get('error') or 'not installed'})",
                        "install the torch of your stack (e.g. torch==2.11.0 from the cu130 index)")]
    findings = []
    cuda = torch.get("cuda")
    if not cuda or int(cuda.split(".")[0]) != CUDA_MAJOR:
        findings.append(Finding("blocking", f"torch {torch['version']} is built for CUDA {cuda or 'none (CPU only)'}, "
                                f"not CUDA {CUDA_MAJOR}", "install a cu130 build of torch"))
    cubins, ptx = _torch_archs(torch)
    for cc in ccs:
        if cubins and best_native(cubins, cc):
            continue
        archs = " ".join(torch.get("arch_list") or ()) or "empty"
        if any(a.ptx_jits_on(cc)[0] for a in ptx):
            findings.append(Finding("warning", f"torch {torch['version']} has no cubin for {cc} (arch list: {archs}); "
                                    "its kernels JIT-compile from PTX", "install a torch built for this GPU"))
        else:
            findings.append(Finding("blocking", f"torch {torch['version']} has no kernel that runs on {cc} "
                                    f"(arch list: {archs})", "install a torch whose arch list covers this GPU"))
    if ccs and not torch.get("available"):
        findings.append(Finding("warning", "a GPU is visible but torch.cuda.is_available() is False",
                                "check the driver and that torch is a CUDA build"))
    return findings


def _knob_findings(knob: str, value: str, cc: ComputeCapability) -> list[Finding]:
    try:
        archs = parse_arch_list(value.replace("+PTX", "").replace("+ptx", ""))
    except BlackwheelError as exc:
        return [Finding("warning", f"{knob}={value!r} cannot be parsed: {exc}")]
    fix = f"export {knob}={ARCH_KNOBS[knob].format(major=cc.major, minor=cc.minor)!r}"
    gb10 = " (GB10 is 12.1, not 12.0)" if cc == ComputeCapability(12, 1) else ""
    if best_native(archs, cc) is None:
        return [Finding("blocking", f"{knob}={value!r} builds no code that runs on this {cc} device{gb10}", fix)]
    if not any(a.cc == cc for a in archs):
        return [Finding("warning", f"{knob}={value!r} does not name this device's {cc}{gb10}: plain cubins run, "
                        f"but packages that add the 'a' suffix build kernels that do not", fix)]
    return []


def check_arch_env(probe: Probe, ccs: list[ComputeCapability]) -> list[Finding]:
    return [f for knob in ARCH_KNOBS if probe.env.get(knob) for cc in ccs
            for f in _knob_findings(knob, probe.env[knob], cc)]


def check_triton(probe: Probe, ccs: list[ComputeCapability]) -> list[Finding]:
    """Triton's bundled ptxas rejects sm_121a on CUDA 13 (triton issue #8539)."""
    if not probe.triton_version or ComputeCapability(12, 1) not in ccs:
        return []
    if probe.env.get("TRITON_PTXAS_PATH") and probe.triton_ptxas_exists:
        return []
    home = probe.env.get("CUDA_HOME") or cuda_home_of(probe.nvcc_real) or "<cuda>"
    return [Finding("blocking", f"triton {probe.triton_version} on 12.1 needs CUDA 13's ptxas "
                    "(its own fails: \"Value 'sm_121a' is not defined\")",
                    f"export TRITON_PTXAS_PATH={home}/bin/ptxas")]


def _rebuild_fix(dist: str) -> str:
    if dist == "flashinfer-cubin":
        return "flashinfer-cubin is NVIDIA's prebuilt cubins: use a flashinfer-jit-cache built by blackwheel"
    recipe = RECIPE_OF.get(dist, dist)
    return f"build {recipe} for this GPU: blackwheel build {recipe} --target native"


def check_packages(probe: Probe, ccs: list[ComputeCapability]) -> list[Finding]:
    findings = []
    for pkg in probe.packages:
        entries = [e for cc in ccs for e in compat_objects(pkg.objects, cc)]
        missing = [e for e in entries if e.verdict == "none"]
        jit = [e for e in entries if e.verdict == "ptx-jit"]
        name = f"{pkg.name} {pkg.version}"
        if missing:
            e = missing[0]
            findings.append(Finding("blocking", f"{name}: {len(missing)} object(s) have no kernel for {e.cc}, "
                                    f"e.g. {e.path} ({e.rule})", _rebuild_fix(pkg.name)))
        if jit:
            e = jit[0]
            findings.append(Finding("warning", f"{name}: {len(jit)} object(s) only JIT-compile PTX on {e.cc}, "
                                    f"e.g. {e.path}", "slow first launch; " + _rebuild_fix(pkg.name)))
    return findings


def analyse(probe: Probe) -> list[Finding]:
    """Every finding for one machine, blocking ones first."""
    ccs = device_ccs(probe)
    findings = (check_gpu(probe) + check_toolkit(probe) + check_host_compiler(probe) + check_torch(probe, ccs)
                + check_arch_env(probe, ccs) + check_triton(probe, ccs) + check_packages(probe, ccs))
    order = {"blocking": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.severity])


# ---- probes (run commands; never raise) ----------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_packages() -> tuple[PackageProbe, ...]:
    found = []
    for name in KERNEL_PACKAGES:
        version = _version(name)
        if version is not None:
            try:
                objects = tuple(o for o in inspect_path(name).objects if o.has_cuda or o.error)
            except BlackwheelError:
                objects = ()
            found.append(PackageProbe(name, version, objects))
    return tuple(found)


def probe_torch() -> dict:
    """The machine probe's torch facts, spelled as doctor's recorded machines spell them."""
    if importlib.util.find_spec("torch") is None:
        return {"error": "not installed"}
    facts = machine.torch_facts(sys.executable)
    if "error" in facts:
        return facts
    out = {"version": facts["torch"], "cuda": facts["torch_cuda"], "available": facts["available"],
           "cxx11_abi": facts["cxx11_abi"], "arch_list": facts["arch_list"]}
    return {**out, **({"device_cc": facts["device_cc"]} if "device_cc" in facts else {})}


def probe_machine() -> Probe:
    smi, smi_error = machine.nvidia_smi()
    nvcc = shutil.which("nvcc")
    nvcc_real = str(machine.resolve_nvcc(Path(nvcc))) if nvcc else None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    env = {k: os.environ[k] for k in ENV_KEYS if os.environ.get(k)}
    ptxas = env.get("TRITON_PTXAS_PATH")
    env_home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    return Probe(
        machine=platform.machine(), nvidia_smi=smi, nvidia_smi_error=smi_error,
        nvcc_path=nvcc, nvcc_real=nvcc_real, nvcc_version=machine.run([nvcc_real, "--version"])[0] if nvcc_real else None,
        path_home_real=os.path.realpath(cuda_home_of(nvcc)) if nvcc else None,
        env_home_real=os.path.realpath(env_home) if env_home else None,
        host_compiler=machine.first_line([compiler, "--version"]) if compiler else None,
        torch=probe_torch(), triton_version=_version("triton"),
        triton_ptxas_exists=bool(ptxas and os.access(ptxas, os.X_OK)), env=env, packages=probe_packages(),
    )


# ---- rendering and command line ------------------------------------------------------------------------
def render_summary(probe: Probe) -> list[str]:
    gpus = parse_gpus(probe.nvidia_smi)
    lines = [f"machine    {probe.machine}"]
    lines += [f"GPU        {g.name}  cc {g.cc}  driver {g.driver}" for g in gpus] or [
        f"GPU        none ({probe.nvidia_smi_error or 'nvidia-smi printed no GPU'})"]
    version = parse_nvcc_version(probe.nvcc_version)
    nvcc = "not found" if not probe.nvcc_path else (
        f"{probe.nvcc_path}" + (f" -> {probe.nvcc_real}" if probe.nvcc_real != probe.nvcc_path else "")
        + f" ({'.'.join(map(str, version)) if version else '?'}); CUDA home {cuda_home_of(probe.nvcc_real)}")
    lines.append(f"nvcc       {nvcc}; CUDA_HOME={probe.env.get('CUDA_HOME', 'unset')}")
    lines.append(f"host c++   {probe.host_compiler or 'not found'}")
    t = probe.torch
    lines.append(f"torch      {t['version']}, CUDA {t.get('cuda')}, C++11 ABI {t.get('cxx11_abi')}, "
                 f"archs {' '.join(t.get('arch_list') or ()) or '-'}" if t.get("version")
                 else f"torch      not importable ({t.get('error')})")
    lines.append(f"triton     {probe.triton_version or 'not installed'}")
    for pkg, verdicts in package_verdicts(probe).items():
        counts = "; ".join(f"on {cc}: " + ", ".join(f"{n} {v}" for v, n in sorted(c.items()))
                           for cc, c in verdicts.items())
        lines.append(f"package    {pkg}: {counts or 'no CUDA objects'}")
    return lines


def package_verdicts(probe: Probe) -> dict[str, dict[str, dict[str, int]]]:
    """'vllm 0.25.1' -> {'12.1': {'native': 1, 'none': 1}}: how its objects fare on each GPU."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for pkg in probe.packages:
        per_cc = out.setdefault(f"{pkg.name} {pkg.version}", {})
        for cc in device_ccs(probe):
            for entry in compat_objects(pkg.objects, cc):
                counts = per_cc.setdefault(str(cc), {})
                counts[entry.verdict] = counts.get(entry.verdict, 0) + 1
    return out


def render(probe: Probe, findings: list[Finding]) -> str:
    lines = render_summary(probe) + ["", "findings:" if findings else "findings: none"]
    for f in findings:
        lines.append(f"  {f.severity.upper():8} {f.message}")
        if f.fix:
            lines.append(f"           fix: {f.fix}")
    return "\n".join(lines)


def report(probe: Probe, as_json: bool) -> tuple[str, int]:
    """The text (or JSON) and exit status for a probe: 1 when a finding is blocking."""
    findings = analyse(probe)
    status = 1 if any(f.severity == "blocking" for f in findings) else 0
    if as_json:
        return json.dumps({"probe": probe.to_dict(), "findings": [f.to_dict() for f in findings],
                           "packages": package_verdicts(probe), "ok": status == 0}, indent=2), status
    return render(probe, findings), status

"""Reproduce Dao-AILab/flash-attention#1969 (no sm_121 code for the GB10) and prove our fix.

Three builds of flash-attn 2.8.3.post2, each as a user would run it:
  upstream, ``FLASH_ATTN_CUDA_ARCHS=121``  -- what a GB10 user writes;
  upstream, the default list (80;90;100;120);
  our recipe for target ``gb10`` (patch 0001 applied).
For each: the generated build file's ``-gencode`` flags, then a *diagnostic build* of a subset of
compile units (``--units``; never published), ``inspect`` of the objects and ``compat --cc 12.1``.
On a GPU that is not 12.1, the mechanism is also shown at run time: a CUDA program built without the
present GPU's arch, run on it, with the driver's exact error.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..toolchain import toolchain as tc_mod
from ..builders.pip_wheel import gencode_flags, generate_build_file
from ..pipeline.build import BuildRequest, build_environment, job_plan, prepare_tree
from ..core.errors import UsageError
from ..core.fsutil import atomic_write_json, atomic_write_text
from ..check.inspect import inspect_path
from ..core.recipe import load_recipe
from ..core.targets import TARGETS, ComputeCapability
from ..check.verify import compat_objects

GB10 = ComputeCapability(12, 1)
# The fix under test; "upstream" scenarios leave it out but keep what the stack's torch needs (C++20).
FIX_PATCH = "0001-honour-sm12x-and-suffixed-archs.patch"
# The lightest units first
# (measured on the 32-core H100 host: 155 s, 157 s, 187 s, 584 s for one sm_90 unit each)
DIAGNOSTIC_UNITS = ("flash_fwd_hdim32_fp16_causal_sm80", "flash_fwd_hdim32_bf16_causal_sm80",
                    "flash_bwd_hdim32_fp16_causal_sm80", "flash_fwd_split_hdim64_fp16_sm80")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    patched: bool
    archs: str | None          # FLASH_ATTN_CUDA_ARCHS; None leaves it unset (upstream's default list)
    compile: bool = True       # compile the diagnostic units (the default list's four arches: flags only)


def scenarios() -> list[Scenario]:
    gb10 = load_recipe("flash-attn").arch.value_for(TARGETS["gb10"])
    return [
        Scenario("upstream-121", "upstream, FLASH_ATTN_CUDA_ARCHS=121 (what a GB10 user writes)", False, "121"),
        Scenario("upstream-default", "upstream, default FLASH_ATTN_CUDA_ARCHS (80;90;100;120)", False, None,
                 compile=False),
        Scenario("blackwheel-gb10", f"blackwheel recipe, target gb10 (FLASH_ATTN_CUDA_ARCHS={gb10}, patched)",
                 True, gb10),
    ]


def _python_error(log: Path) -> str | None:
    """The exception a setup.py died of (e.g. torch's arch detection with no GPU and no arch list)."""
    found = re.findall(r"^\s*(\w+(?:Error|Exception): .+)$", log.read_text(errors="replace"), re.MULTILINE)
    return found[-1].strip() if found else None


def _compile_units(build_dir: Path, text: str, units: int, env: dict) -> tuple[list[Path], str | None]:
    """Compile the first ``units`` diagnostic units with the real ninja, from the generated file."""
    outputs = []
    for stem in DIAGNOSTIC_UNITS[:units]:
        for line in text.splitlines():
            if line.startswith("build ") and f"/{stem}.o:" in line:
                outputs.append(line.split()[1].rstrip(":").replace("$:", ":"))
    if not outputs:
        return [], "no diagnostic unit found in the build file"
    proc = subprocess.run(["ninja", "-C", str(build_dir), "-f", "build.ninja", *outputs], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        both = proc.stdout + proc.stderr
        tail = [ln for ln in both.splitlines() if "error" in ln.lower()][:1]
        return [], f"compile failed: {tail[0] if tail else both.strip()[-300:]}"
    return [Path(o) for o in outputs], None


def run_scenario(req: BuildRequest, toolchain, sc: Scenario, work: Path, units: int) -> dict:
    prepared = prepare_tree(req, work / sc.name / "src", without=() if sc.patched else (FIX_PATCH,))
    env = build_environment(req, toolchain, prepared, job_plan(req))
    # a plain user shell: no arch list of torch's, flash-attn's knob as the scenario says
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.pop("FLASH_ATTN_CUDA_ARCHS", None)
    if sc.archs is not None:
        env["FLASH_ATTN_CUDA_ARCHS"] = sc.archs
    log = work / sc.name / "plan.log"
    text, result = generate_build_file(req, prepared.tree, env, work / sc.name / "build.ninja", log)
    out = {"scenario": sc.name, "description": sc.description, "patched": sc.patched,
           "FLASH_ATTN_CUDA_ARCHS": sc.archs, "patches": [p["file"] for p in prepared.patches]}
    if text is None:
        out.update(build_file=False, error=_python_error(log) or result.first_error or "no build file",
                   objects=[])
        return out
    out.update(build_file=True, gencode=gencode_flags(text),
               torch_fallback=not gencode_flags(text) or "TORCH_CUDA_ARCH_LIST" in (result.first_error or ""))
    # the kept build file holds absolute paths, so it compiles from its own folder (newer pip and
    # setuptools remove the package's build/ folder after the stopped build)
    objs, err = _compile_units(work / sc.name, text, units, env) if units and sc.compile else ([], None)
    if not sc.compile:
        err = "flags only (four arches: not compiled, to keep the diagnostic build small)"
    out["diagnostic_units"] = [o.name for o in objs]
    out["error"] = err
    out["objects"] = []
    for obj in objs:
        report = inspect_path(obj)
        for o, c in zip(report.objects, compat_objects(report.objects, GB10)):
            out["objects"].append({"object": obj.name, "cubins": [str(a) for a in o.cubins],
                                   "ptx": [str(a) for a in o.ptx], "compat_12_1": c.verdict,
                                   "rule": c.rule})
    return out


# ---- the run-time half: a build lacking the present GPU's arch, run on it ------------------------------
_PROGRAM = r"""
#include <cstdio>
__global__ void k(int* x) { *x = 42; }
int main() {
  int* d; cudaMalloc(&d, sizeof(int));
  k<<<1, 1>>>(d);
  cudaError_t e = cudaGetLastError();            // a launch without a usable image fails here
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  int h = 0; cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  printf("%s|%s|%d\n", cudaGetErrorName(e), cudaGetErrorString(e), h);
  return e == cudaSuccess ? 0 : 1;
}
"""


def runtime_demo(cc: ComputeCapability, cuda_home: str, work: Path) -> dict:
    """Build the same kernel for 12.1 only and for the present GPU; run both here."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / "probe.cu"
    src.write_text(_PROGRAM)
    nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    out = {"device_cc": str(cc)}
    for label, arch in (("built for 12.1 only (sm_121)", "121"), ("control: built for this GPU", f"{cc.major}{cc.minor}")):
        exe = work / f"probe_{arch}"
        subprocess.run([nvcc, "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-o", str(exe), str(src)],
                       check=True, capture_output=True)
        compat = compat_objects(inspect_path(exe).objects, cc)
        proc = subprocess.run([str(exe)], capture_output=True, text=True)
        name, _, rest = proc.stdout.strip().partition("|")
        message, _, value = rest.partition("|")
        out[label] = {"compat": compat[0].verdict if compat else "none", "rule": compat[0].rule if compat else "",
                      "exit": proc.returncode, "cuda_error": name, "message": message, "result": value}
    return out


# ---- report ------------------------------------------------------------------------------------------
def render_markdown(results: list[dict], runtime: dict | None, units: int, machine: str) -> str:
    lines = ["# flash-attention #1969 reproduced: GB10 (12.1) and FLASH_ATTN_CUDA_ARCHS", "",
             f"Machine: {machine}. flash-attn 2.8.3.post2 sdist (sha256-pinned), nvcc 13.",
             f"Diagnostic build: {units} compile unit(s) per scenario (never published); "
             "the full list of -gencode flags comes from the generated build file of all 73 units.", "",
             "| scenario | FLASH_ATTN_CUDA_ARCHS | -gencode flags in build file | cubins / PTX in the object | compat --cc 12.1 |",
             "|---|---|---|---|---|"]
    for r in results:
        flags = ", ".join(f.split()[-1] for f in r.get("gencode", [])) or \
            ("**none**" if r.get("build_file") else f"no build file: {r.get('error')}")
        objs = r.get("objects") or []
        inside = "; ".join(f"{' '.join(o['cubins']) or '-'} / {' '.join(o['ptx']) or '-'}" for o in objs) or \
            (r.get("error") or "not compiled")
        verdict = "; ".join(f"{o['compat_12_1']} ({o['rule']})" for o in objs) or "-"
        lines.append(f"| {r['description']} | {r['FLASH_ATTN_CUDA_ARCHS'] or '(unset)'} | {flags} | {inside} | {verdict} |")
    lines += ["", "## What was reproduced", ""]
    up = next(r for r in results if r["scenario"] == "upstream-121")
    if not any("12" in f for f in up.get("gencode", [])):
        lines.append("- Upstream with `FLASH_ATTN_CUDA_ARCHS=121` emits **no** `-gencode` flag of its own: `121` "
                     "is silently ignored, as #1969 reports. The binary then holds whatever torch's fallback "
                     "picks (`TORCH_CUDA_ARCH_LIST` if set -- unset here --, else the visible GPUs' archs, "
                     "clamped to torch's own list, else nothing): "
                     + (f"here the build died: `{up.get('error')}`." if not up.get("build_file")
                        else f"here {', '.join(f.split()[-1] for f in up['gencode']) or 'no flag'}, "
                             "nothing for 12.x."))
    fix = next(r for r in results if r["scenario"] == "blackwheel-gb10")
    ok = [o for o in fix.get("objects", []) if o["compat_12_1"] == "native"]
    lines.append(f"- With our patch, target gb10 gets {', '.join(f.split()[-1] for f in fix.get('gencode', []))}; "
                 + ("every diagnostic object runs natively on 12.1." if ok and len(ok) == len(fix["objects"])
                    else "the diagnostic objects were not compiled in this run."))
    if runtime:
        lines += ["", f"## At run time on this GPU ({runtime['device_cc']})", ""]
        for label, r in runtime.items():
            if isinstance(r, dict):
                lines.append(f"- {label}: compat predicted `{r['compat']}` ({r['rule']}); ran: exit {r['exit']}, "
                             f"`{r['cuda_error']}`: \"{r['message']}\"")
    lines += ["", "Upstream scenarios leave out our patch " + FIX_PATCH + " only; patches the stack's torch "
              "needs to compile at all (C++20 for torch 2.14) stay in.", "", "## Not reproduced here", "",
              "- The real thing on a 12.1 device: no GB10 is available to this project; the 12.1 verdicts above "
              "come from the binaries and the compatibility rules, not from a 12.1 run.",
              "- PyTorch's mem-efficient SDPA message (\"kernel ... is for sm80-sm100, but was built for sm121\") "
              "needs a torch built natively for sm_121, which no torch release is."]
    return "\n".join(lines) + "\n"


def reproduce(stack, python: str, units: int, out: Path, name: str, fetcher, cc: ComputeCapability | None) -> str:
    """Every scenario of #1969 on gb10's arch list, the runtime demo where a non-12.1 GPU is visible
    (``cc``), and the report written to ``out/name.{json,md}``; returns the Markdown."""
    if not 0 <= units <= len(DIAGNOSTIC_UNITS):
        raise UsageError(f"--units must be 0..{len(DIAGNOSTIC_UNITS)}")
    req = BuildRequest(load_recipe("flash-attn"), stack, TARGETS["gb10"], python=python, fetcher=fetcher)
    toolchain = tc_mod.probe(python)
    tc_mod.check(toolchain, stack.torch, None, "flash-attn")
    work = Path(tempfile.mkdtemp(prefix="repro-1969-"))
    with ThreadPoolExecutor(max_workers=3) as pool:   # independent trees; mostly waiting on subprocesses
        results = list(pool.map(lambda sc: run_scenario(req, toolchain, sc, work, units), scenarios()))
    runtime = runtime_demo(cc, toolchain.cuda_home, work / "runtime") if cc and cc != GB10 else None
    machine = f"{os.uname().machine}, {os.cpu_count()} cores, GPU {cc or 'none'}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", {"scenarios": results, "runtime": runtime, "machine": machine})
    md = render_markdown(results, runtime, units, machine)
    atomic_write_text(out / f"{name}.md", md)
    shutil.rmtree(work, ignore_errors=True)
    return md

"""Build-speed benchmark: our build against upstream's own command, same machine, same run.

    python -m blackwheel.bench_build flash-attn --target hopper [--units N] --out DIR

Both runs compile the same patched sources from separate extractions, cold (no compiler cache):
- **ours**: jobs from cores and memory (``jobs.plan_jobs``), one nvcc thread for one arch, units
  slowest-first from the recorded profile (the ninja stand-in);
- **upstream**: the package's own defaults (flash-attn: ``MAX_JOBS`` from its own formula,
  ``NVCC_THREADS=4``, units in setup.py's order).
``--units N`` compiles a fixed subset (the same for both: the N units of the recorded profile taken
evenly from slowest to fastest, then in setup.py's order), for machines whose time does not
allow two full builds; the subset build stops at the link, which both runs reach. The report
gives each wall time, peak memory, the ratio, and how close ours came to the limit on this machine
(sum of unit times / cores, or the longest unit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import toolchain as tc_mod
from .build import BuildRequest, build_environment, job_plan, longest_first_env, prepare_tree, \
    profile_path, record_unit_times, run_pip_wheel
from .fsutil import atomic_write_json, atomic_write_text
from .jobs import machine_resources
from .ninja import SHIM_LOGS_ENV, SHIM_ONLY_ENV, write_ninja_shim
from .recipe import load_recipe, load_stack
from .targets import resolve_target

UPSTREAM_UNSET = ("MAX_JOBS", "NVCC_THREADS", "PYTORCH_NVCC", "BLACKWHEEL_NINJA_TIMES")


def pick_units(profile: dict[str, float], n: int) -> list[str]:
    """``n`` units spread evenly over the profile from slowest to fastest (heavy and light).

    >>> pick_units({"a.o": 9, "b.o": 5, "c.o": 1, "d.o": 3}, 2)
    ['a.o', 'c.o']
    """
    ranked = sorted(profile, key=lambda u: -profile[u])
    if n >= len(ranked):
        return ranked
    step = (len(ranked) - 1) / max(n - 1, 1)
    return [ranked[round(i * step)] for i in range(n)]


def _run(label: str, req: BuildRequest, env: dict, work: Path, units: list[str]) -> dict:
    shim = write_ninja_shim(work / "shim", shutil.which("ninja", path=env["PATH"]) or "ninja").parent
    env = {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", SHIM_LOGS_ENV: str(work / "ninja-logs"),
           "TORCH_NO_COMPILER_WRAPPER": "1"}
    if units:
        env[SHIM_ONLY_ENV] = ",".join(units)
    tree = next(p for p in (work / "src").iterdir() if p.is_dir())
    result = run_pip_wheel(req, tree, env, work / "dist", work / f"{label}.log")
    times = record_unit_times(req, work)
    compiled = len(times) if units else result.units_total
    if not units and result.returncode != 0:
        raise SystemExit(f"{label} build failed: {result.first_error} (log {result.log})")
    return {"wall_s": round(result.wall_s, 1), "peak_mem_gib": round(result.peak_mem_bytes / 2**30, 2),
            "units_compiled": compiled, "unit_seconds": {k: round(v, 1) for k, v in sorted(times.items())},
            "jobs": env.get("MAX_JOBS", "upstream default"), "nvcc_threads": env.get("NVCC_THREADS", "default"),
            "log": str(result.log)}


def side_by_side(req: BuildRequest, units: int, out: Path) -> dict:
    toolchain = tc_mod.probe(req.python)
    tc_mod.check(toolchain, req.stack.torch, req.version.gcc, req.recipe.name)
    profile = json.loads(profile_path(req.recipe, req.version.version).read_text())["units"] \
        if profile_path(req.recipe, req.version.version).is_file() else {}
    subset = pick_units(profile, units) if units else []
    root = req.workdir / "bench-build"
    shutil.rmtree(root, ignore_errors=True)
    runs = {}
    for label in ("upstream", "ours"):          # upstream first: any cache warmth favours upstream
        work = root / label
        prepared = prepare_tree(req, work / "src")
        plan = job_plan(req)
        env = build_environment(req, toolchain, prepared, plan)
        if label == "ours":
            env = longest_first_env(req, env, work)
        else:
            env = {k: v for k, v in env.items() if k not in UPSTREAM_UNSET}
        runs[label] = _run(label, req, env, work, subset)
    cores, avail = machine_resources()
    ours = runs["ours"]
    total = sum(ours["unit_seconds"].values())
    longest = max(ours["unit_seconds"].values(), default=0.0)
    limit = max(total / cores, longest)
    return {"package": req.recipe.name, "version": req.version.version, "target": req.target.name,
            "machine": {"cores": cores, "available_gib": round(avail / 2**30, 1), "host": os.uname().nodename},
            "subset": subset or "all units", "runs": runs,
            "ratio_ours_to_upstream": round(ours["wall_s"] / runs["upstream"]["wall_s"], 3),
            "limit_s": round(limit, 1), "ours_over_limit": round(ours["wall_s"] / limit, 3) if limit else None,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def render(result: dict) -> str:
    up, ours = result["runs"]["upstream"], result["runs"]["ours"]
    subset = result["subset"]
    what = "all units" if isinstance(subset, str) else f"{len(subset)} units: {', '.join(subset)}"
    return "\n".join([
        f"# Build speed: {result['package']} {result['version']} for {result['target']}", "",
        f"Machine: {result['machine']['cores']} cores, {result['machine']['available_gib']} GiB available. "
        f"Same run, cold, no compiler cache. Compiled: {what}.", "",
        "| run | wall s | peak GiB | jobs | nvcc threads |", "|---|---|---|---|---|",
        f"| upstream's command | {up['wall_s']} | {up['peak_mem_gib']} | {up['jobs']} | {up['nvcc_threads']} |",
        f"| blackwheel | {ours['wall_s']} | {ours['peak_mem_gib']} | {ours['jobs']} | {ours['nvcc_threads']} |",
        "", f"Ours / upstream: **{result['ratio_ours_to_upstream']}**. Limit on this machine (sum of unit times "
        f"/ cores, or the longest unit): {result['limit_s']} s; ours took {result['ours_over_limit']}x that.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blackwheel.bench_build", description=__doc__.splitlines()[0])
    p.add_argument("package")
    p.add_argument("--target", default="hopper")
    p.add_argument("--stack")
    p.add_argument("--units", type=int, default=0, help="compile this many units of the profile (0: all)")
    p.add_argument("--out", type=Path, default=Path("docs/reports"))
    args = p.parse_args(argv)
    req = BuildRequest(load_recipe(args.package), load_stack(args.stack), resolve_target(args.target),
                       python=sys.executable)
    result = side_by_side(req, args.units, args.out)
    stem = f"bench-build-{args.package}-{args.target}"
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

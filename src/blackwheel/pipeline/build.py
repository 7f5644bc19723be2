"""Build: one recipe, one stack, one target -> a verified wheel in the wheelhouse.

Order of work, cheapest refusal first:
 1. toolchain checks (CUDA 13, host compiler, torch == the stack's)   -- before any fetch
 2. build key from every input; an intact wheel with that key is reused
 3. fetch (hash-verified), extract, place resources, apply patches; stack pins checked
 4. the package's own build, offline, with planned jobs and live progress
 5. retag (local version ``+cu130.sm121``), verify the CUDA code, place atomically with a manifest
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from packaging.requirements import InvalidRequirement, Requirement

from ..builders import BuildRequest, Prepared, builder_for
from ..check.verify import torch_link_failures, verify_wheel, with_findings
from ..core.errors import BuildFailed, StackMismatch, ToolchainError, UsageError
from ..core.fsutil import atomic_write_json, flocked, sha256_file
from ..core.recipe import Recipe, requirement_lines, stack_disagreements
from ..core.targets import Target, parse_arch_list
from ..release.manifest import Manifest, read_manifest
from ..release.wheelhouse import (find_reusable, local_version, name_taken_elsewhere, place, retag_wheel,
                                  torch_requirement)
from ..sources.fetch import safe_extract
from ..sources.patch import apply_series
from ..toolchain import memgate
from ..toolchain import toolchain as tc_mod
from ..toolchain.ccache import (DOWN_FLAG, CacheConfig, StoreWatch, start_with_fallback, stats, stop_server,
                                write_launcher, zero_stats)
from ..toolchain.interrupt import OWNER_ENV, end_orphans, owner_mark
from ..toolchain.jobs import machine_resources, memgate_env, plan_jobs
from ..toolchain.ninja import (FLAGS_APPLIED, SHIM_FLAGS_ENV, SHIM_LOGS_ENV, SHIM_TIMES_ENV, build_profile,
                               read_ninja_log, unit_key, write_ninja_shim)

BUILDER_VERSION = "1"   # bump when the way wheels are produced changes


@dataclass
class BuildOutcome:
    wheel: Path
    manifest: dict
    reused: bool


# ---- the build key -------------------------------------------------------------------------------
def build_inputs(req: BuildRequest, toolchain: tc_mod.Toolchain,
                 nvcc_flags: Mapping[str, list[str]] = {}) -> dict:
    """What the wheel is made from; ``nvcc_flags``: units given extra flags on this machine (they
    change the device code, so a build with them never reuses one without)."""
    rv = req.version
    archs = req.recipe.arch.archs_for(req.target)
    return {
        "builder": BUILDER_VERSION,
        "recipe": sha256_file(req.recipe.path),
        "package": req.recipe.name, "version": rv.version,
        "sources": [s.to_dict() for s in req.recipe.sources_for(rv.version, req.target, req.stack.torch)],
        "patches": [sha256_file(p.file) for p in rv.patches_for(req.target, req.stack.torch)],
        "target": req.target.name, "archs": [a.dotted for a in archs],
        "env": req.recipe.env, "toolchain": toolchain.identity(),
        **builder_for(req.recipe).key(req),
        **({"variants": req.variants} if rv.variants else {}),
        **({"nvcc_flags": dict(sorted(nvcc_flags.items()))} if nvcc_flags else {}),
    }


def build_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ---- preparing the tree --------------------------------------------------------------------------
@dataclass
class PreparedTree:
    tree: Path
    patches: list[dict]
    resource_env: dict[str, str]
    sources: list[dict] = field(default_factory=list)   # each as fetched and verified (manifest)
    notes: list[str] = field(default_factory=list)      # optional resources left out, one line each
    absent: list[str] = field(default_factory=list)     # their names


def prepare_tree(req: BuildRequest, dest: Path, without: tuple[str, ...] = ()) -> PreparedTree:
    """Fetched, verified, extracted, resources placed, patched; pins checked against the sdist.

    ``without`` names patch files left out: upstream as a user would build it (#1969 reproduction)."""
    rv = req.version
    sdist, *resources = req.recipe.sources_for(rv.version, req.target, req.stack.torch)
    # every pin is fetched and verified before the tree is touched: a missing source fails here
    fetched = [(res, *req.fetcher.fetch_optional(res)) for res in resources]
    if dest.exists():
        shutil.rmtree(dest)
    tree = safe_extract(req.fetcher.fetch(sdist), dest)
    resource_env: dict[str, str] = {}
    records, notes = [req.fetcher.record(sdist)], []
    for res, path, note in fetched:
        if path is None:                 # optional and not to be had: an empty folder stands in
            notes.append(note)
            print(f"note: {note}", file=sys.stderr)
            path = _mk(dest.parent / "absent" / res.name)
            records.append({**res.to_dict(), "absent_optional": note})
        else:
            records.append(req.fetcher.record(res))
        if res.dest:
            shutil.copytree(path, tree / res.dest, symlinks=True, dirs_exist_ok=True)
        if res.env:
            resource_env[res.env] = str(path)
    wanted = [p for p in rv.patches_for(req.target, req.stack.torch) if p.file.name not in without]
    applied = apply_series(wanted, tree)
    problems = stack_disagreements(req.stack, req.recipe, tree)
    if problems:
        raise StackMismatch(f"stack {req.stack.name}: {'; '.join(problems)}")
    absent = [res.name for res, path, _ in fetched if path is None]
    return PreparedTree(tree, applied, resource_env, records, notes, absent)


# ---- what the package's own build needs in the build Python ----------------------------------------
def build_requirements(tree: Path, recipe: Recipe) -> list[str]:
    """The package's own build requirements: ``build-system.requires`` of its pyproject.toml and
    the recipe's ``build-requirements-files`` (vLLM: requirements/build/cuda.txt). torch is left out:
    the toolchain check holds it to the stack's pin."""
    lines: list[str] = []
    pyproject = tree / "pyproject.toml"
    if pyproject.is_file():
        lines += tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", [])
    for rel in recipe.expect.get("build-requirements-files", []):
        if (tree / rel).is_file():
            lines += requirement_lines(tree / rel)
    out = []
    for line in dict.fromkeys(lines):
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() != "torch" and (req.marker is None or req.marker.evaluate()):
            out.append(str(req))
    return out


def unmet_requirements(python: str, requirements: list[str]) -> list[str]:
    """Each requirement the build Python does not satisfy, as ``req (have X | missing)``."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    reqs = [Requirement(r) for r in requirements]
    proc = subprocess.run([python, "-c", code, *[r.name for r in reqs]], capture_output=True, text=True)
    have = json.loads(proc.stdout or "{}")
    out = []
    for r in reqs:
        found = have.get(r.name)
        if found is None:
            out.append(f"{r} (missing)")
        elif r.specifier and not r.specifier.contains(found, prereleases=True):
            out.append(f"{r} (have {found})")
    return out


def install_build_requirements(python: str, requirements: list[str]) -> None:
    """``pip install --upgrade`` what is unmet: a venv keeps the setuptools its Python bundled
    (3.11: 65.5) and a plain install does not upgrade it, while FlashInfer needs >= 77."""
    unmet = [u.split(" (")[0] for u in unmet_requirements(python, requirements)]
    if not unmet:
        return
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--upgrade", *unmet])
    if proc.returncode != 0:
        raise ToolchainError(f"could not install the build requirements {', '.join(unmet)} into {python}")


def check_build_requirements(req: BuildRequest, tree: Path) -> None:
    """Refuse, before compiling, a build Python that lacks what the package's own build declares."""
    unmet = unmet_requirements(req.python, build_requirements(tree, req.recipe))
    if unmet:
        wanted = " ".join(shlex.quote(u.split(" (")[0]) for u in unmet)
        raise ToolchainError(f"{req.recipe.name} {req.version.version}'s build needs, in {req.python}: "
                             f"{'; '.join(unmet)}: {req.python} -m pip install --upgrade {wanted} "
                             f"(nox sessions install them)")


# ---- environment ---------------------------------------------------------------------------------
def job_plan(req: BuildRequest):
    """Jobs and nvcc threads for the CPUs this thread may use and the free memory."""
    cores, avail = machine_resources()
    unit_gib = float(req.recipe.expect.get("unit-memory-gib", 2.0))
    archs = req.recipe.arch.archs_for(req.target)
    plan = plan_jobs(cores, avail, int(unit_gib * 2**30), arch_count=len(archs))
    if req.jobs:
        plan = replace(plan, jobs=req.jobs, reason=f"--jobs {req.jobs} given")
    return plan


def build_environment(req: BuildRequest, toolchain: tc_mod.Toolchain, prepared: PreparedTree,
                      plan) -> dict[str, str]:
    base = tc_mod.build_env(toolchain)
    env = builder_for(req.recipe).environment(req, toolchain, base, {**base, **req.recipe.env})
    env.update(prepared.resource_env)
    env.update(req.variant_env())
    env.update(req.extra_env)
    env[req.recipe.arch.knob] = req.recipe.arch.value_for(req.target)
    env.update(plan.env_for(req.recipe.jobs_style))
    # no network after fetch: pip may not look at an index, and nothing may prompt
    env.update({"PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1"})
    env[OWNER_ENV] = owner_mark()   # if this blackwheel is killed, the next build ends what it left
    return env


def _single_wheel(out: Path, recipe: Recipe) -> Path:
    found = sorted(out.glob("*.whl"))
    if len(found) != 1:
        raise BuildFailed(f"{recipe.name}: expected one wheel from the build, found {len(found)}")
    return found[0]


def left_out_libraries(req: BuildRequest, absent: Iterable[str]) -> dict[str, str]:
    """``{library glob: why}`` for the wheel libraries this build does not make: those of a variant
    that is off, and those of an optional resource left out. Expectations naming them are dropped."""
    chosen = req.variants
    out = {g: f"variant {v.name}=off" for v in req.version.variants if not chosen[v.name] for g in v.libraries}
    gone = set(absent)
    out.update({g: f"optional {res.name} left out" for res in req.version.resources
                if res.name in gone for g in res.libraries})
    return out


def check_expected_libraries(wheel: Path, recipe: Recipe, left_out: Mapping[str, str] = {}) -> None:
    """Every ``expect.cuda-libraries`` glob must match a member of the wheel (but those left out)."""
    with zipfile.ZipFile(wheel) as zf:
        members = zf.namelist()
    for pattern in [p for p in recipe.expect.get("cuda-libraries", []) if p not in left_out]:
        # a pattern with a folder ("vllm/_C*.so") matches the member's path, a bare one its name
        names = members if "/" in pattern else [Path(n).name for n in members]
        if not fnmatch.filter(names, pattern):
            raise BuildFailed(f"{recipe.name}: the wheel has no {pattern}: the CUDA extension was not built")


def verify_built(wheel: Path, req: BuildRequest, left_out: Mapping[str, str] = {}) -> dict:
    required = {g: archs for g, archs in _required_cubins(req.recipe, req.target).items() if g not in left_out}
    report = verify_wheel(wheel, req.target, required or None, req.recipe.expect.get("ptx-only-ok", ()))
    report = with_findings(report, torch_link_failures(report.objects, req.recipe.links_torch, req.recipe.name),
                           [f"not expected: {g} ({why})" for g, why in sorted(left_out.items())])
    report.raise_for_failure()
    return report.to_dict()


def _required_cubins(recipe: Recipe, target: Target) -> dict:
    # [expect.cubins.<target>] "library glob" = ["12.1a", ...]: cubins a library must carry
    per_target = recipe.expect.get("cubins", {}).get(target.name, {})
    return {glob: list(parse_arch_list(archs)) for glob, archs in per_target.items()}


# ---- longest first, and the unit times that drive it -------------------------------------------------
def profile_path(recipe: Recipe, version: str) -> Path:
    """Recorded per-unit compile times: ``recipes/profiles/<package>-<version>.json``."""
    return recipe.path.parent / "profiles" / f"{recipe.name}-{version}.json"


def recorded_units(req: BuildRequest) -> dict[str, float]:
    """The recorded profile's seconds per compile unit; {} when none is recorded."""
    recorded = profile_path(req.recipe, req.version.version)
    return json.loads(recorded.read_text()).get("units", {}) if recorded.is_file() else {}


def longest_first_env(req: BuildRequest, env: dict[str, str], work: Path,
                      nvcc_flags: Mapping[str, list[str]] = {}) -> dict[str, str]:
    """Put the ninja shim first on PATH: it reorders build.ninja slowest-first, keeps the log and
    gives the units of ``nvcc_flags`` their flags (``unflagged`` checks afterwards)."""
    real = shutil.which("ninja", path=env["PATH"])
    if real is None:
        if nvcc_flags:
            raise BuildFailed(f"no ninja on the build's PATH to give {len(nvcc_flags)} units their nvcc flags")
        return env
    shim = write_ninja_shim(work / "shim", real).parent
    env = {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", SHIM_LOGS_ENV: str(work / "ninja-logs")}
    times = recorded_units(req)
    if times:
        (work / "unit-times.json").write_text(json.dumps(times))
        env[SHIM_TIMES_ENV] = str(work / "unit-times.json")
    if nvcc_flags:
        atomic_write_json(work / "nvcc-flags.json", dict(nvcc_flags))
        env[SHIM_FLAGS_ENV] = str(work / "nvcc-flags.json")
    return env


def unflagged(work: Path, nvcc_flags: Mapping[str, list[str]]) -> list[str]:
    """The units of ``nvcc_flags`` whose command the stand-in did not change (not in any build.ninja)."""
    applied = work / "ninja-logs" / FLAGS_APPLIED
    return sorted(set(nvcc_flags) - set(applied.read_text().split() if applied.is_file() else []))


# ---- nvcc -split-compile, where the longest units bound the build ------------------------------------
def units_to_split(profile: Mapping[str, float], subset: Sequence[str] = ()) -> list[str]:
    """The units of the profile longer than its median (of those in ``subset``, when there is one).

    >>> units_to_split({"a.o": 9, "b.o": 5, "c.o": 1, "d.o": 3})
    ['a.o', 'b.o']
    >>> units_to_split({"a.o": 9, "b.o": 5, "c.o": 1, "d.o": 3}, ["b.o", "c.o"])
    ['b.o']
    """
    median = statistics.median(profile.values())
    return sorted(u for u, s in profile.items() if s > median and (not subset or u in subset))


def split_flags(profile: Mapping[str, float], threads: int, subset: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{unit: ["-split-compile=N"]}`` for each unit of ``units_to_split``, bound or not."""
    return {u: [f"-split-compile={threads}"] for u in units_to_split(profile, subset)}


def split_compile_flags(profile: Mapping[str, float], cores: int, threads: int,
                        subset: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{unit: ["-split-compile=N"]}`` for the long units, when the profile says a build on ``cores``
    CPUs is bound by its longest unit (longest > unit time / cores); else {}. Splitting costs about
    10 % more compile work (docs/reports/split-compile-flash-attn.md): where the CPUs are the
    bound, that is lost time, not saved.

    >>> p = {"a.o": 40, "b.o": 10, "c.o": 10, "d.o": 10}     # 70 s of units; median 10
    >>> split_compile_flags(p, cores=1, threads=2)           # 70 s on one CPU: the CPU bounds it
    {}
    >>> split_compile_flags(p, cores=2, threads=2)           # 35 s a CPU: a.o's 40 s bounds it
    {'a.o': ['-split-compile=2']}
    """
    units = {u: t for u, t in profile.items() if not subset or u in subset}
    if not threads or not units or max(units.values()) <= sum(units.values()) / cores:
        return {}
    return split_flags(profile, threads, subset)


def split_compile_for(req: BuildRequest, cores: int, subset: Sequence[str] = ()) -> dict[str, list[str]]:
    """The recipe's ``[split-compile]`` on this build's CPUs ({} without the table or a profile)."""
    if not req.recipe.split_compile:
        return {}
    return split_compile_flags(recorded_units(req), cores, req.recipe.split_compile, subset)


def record_unit_times(req: BuildRequest, work: Path) -> dict[str, float]:
    """Unit times of this build, from the ninja logs the shim kept."""
    times: dict[str, float] = {}
    for log in sorted((work / "ninja-logs").glob("*.ninja_log")):
        tmp = work / "ninja-read"
        tmp.mkdir(exist_ok=True)
        shutil.copyfile(log, tmp / ".ninja_log")
        times.update({unit_key(k): v for k, v in read_ninja_log(tmp).items()})
    return times


def _profile(unit_times: dict[str, float], result, plan, cache_stats) -> dict | None:
    if not unit_times:
        return None
    cores = machine_resources()[0]
    prof = build_profile(unit_times, result.wall_s, cores, result.peak_mem_bytes, cache_stats)
    prof["unit_times"] = {k: round(v, 1) for k, v in sorted(unit_times.items())}
    return prof


# ---- the compiler cache and the memory gate ------------------------------------------------------
@dataclass
class CacheSession:
    """A running sccache server for one build; ``finish`` returns its stats and stops it."""

    sccache: str
    env: dict[str, str]
    note: str
    watch: object = None   # ccache.StoreWatch of a remote store

    def finish(self) -> dict:
        if self.watch is not None:
            self.watch.stop()
        if self.watch is not None and self.watch.fell_back:   # the server was abandoned: no stats to ask
            out = {"store": self.note, "fell_back": self.watch.fell_back}
        else:
            try:
                out = {**stats(self.sccache, self.env), "store": self.note}
            except Exception as exc:  # stats are a report, never a reason to lose a finished build
                out = {"store": self.note, "error": str(exc)}
        stop_server(self.sccache, self.env)
        return out


def _sccache_binary(env: dict[str, str]) -> str | None:
    beside = Path(sys.executable).parent / "sccache"
    return str(beside) if beside.is_file() else shutil.which("sccache", path=env.get("PATH"))


def start_compile_cache(req: BuildRequest, env: dict[str, str], toolchain, tree: Path, plan, config=None,
                        work: Path | None = None):
    """sccache (``config``, else BLACKWHEEL_CACHE_URL; local disk by default) and the memory gate in front of
    nvcc; the build's sccache launcher is written in ``work`` (default: beside ``tree``)."""
    unit_bytes = int(float(req.recipe.expect.get("unit-memory-gib", 2.0)) * 2**30)
    env = {**env, **memgate_env(plan, unit_bytes)}
    gate = [sys.executable, memgate.__file__, "--"]
    nvcc = str(Path(toolchain.cuda_home) / "bin" / "nvcc")
    config = config or CacheConfig.from_env()
    sccache = _sccache_binary(env)
    if config.kind == "off" or sccache is None:
        why = "off" if config.kind == "off" else "sccache not installed"
        print(f"compiler cache: none ({why})", file=sys.stderr)
        return {**env, "PYTORCH_NVCC": shlex.join(gate + [nvcc]), "TORCH_NO_COMPILER_WRAPPER": "1"}, None
    launcher = write_launcher((work or tree.parent) / "sccache", sccache)   # skips sccache once the store is down
    config, env, note = start_with_fallback(config, sccache, env, source_root=tree, nvcc=nvcc, nvcc_prefix=gate,
                                            launcher=launcher)
    print(note, file=sys.stderr)
    if config.kind == "off":
        return env, None
    zero_stats(sccache, env)
    watch = StoreWatch(config, env, launcher.parent / DOWN_FLAG).start() if config.kind in ("redis", "s3") else None
    return env, CacheSession(sccache, env, note, watch)


def _reusable(req: BuildRequest, key: str, why: str) -> BuildOutcome | None:
    reused = None if req.force else find_reusable(req.wheelhouse, req.stack.name, req.target.name,
                                                  req.recipe.name, key)
    if reused is None:
        return None
    wheel = req.wheelhouse / req.stack.name / req.target.name / reused["wheel"]
    print(f"reused {wheel.name} (build key {key[:12]}: {why})", file=sys.stderr)
    return BuildOutcome(wheel, reused, True)


def build_package(req: BuildRequest) -> BuildOutcome:
    rv = req.version
    toolchain = tc_mod.probe(req.python, cache_dir=req.fetcher.cache)
    tc_mod.check(toolchain, req.stack.torch, rv.gcc, req.recipe.name)
    inputs = build_inputs(req, toolchain, split_compile_for(req, machine_resources()[0]))
    key = build_key(inputs)
    outcome = _reusable(req, key, "identical inputs")
    if outcome:
        return outcome
    _refuse_a_name_another_stack_holds(req)
    # a fixed folder per package/version/target: the compiler cache hits only for sources at the same path
    work = req.workdir / "-".join([req.recipe.name, rv.version, req.target.name, *req.variant_tags])
    label = f"{req.recipe.name} {rv.version} [{req.target.name}]"
    # one build at a time in a work folder: a second run of the same build waits, then reuses the
    # first's wheel (its key matches) instead of deleting the tree the first one compiles
    with flocked(work, lambda: print(f"waiting for another build of {label}: it holds {work}",
                                     file=sys.stderr)) as waited:
        why = "built by the run this one waited for" if waited else "identical inputs"
        return _reusable(req, key, why) or _build(req, toolchain, inputs, key, work)


def wheel_local_version(req: BuildRequest) -> str:
    """The built wheel's local version: CUDA, the stack's torch where the recipe links it, target, variants."""
    return local_version(req.stack.cuda, req.target.tag, req.variant_tags,
                         req.stack.torch if req.recipe.links_torch else None)


def _refuse_a_name_another_stack_holds(req: BuildRequest) -> None:
    """Before any compile: the wheel's file name (dist, version, local version) must not already be
    another stack's, whose bytes differ (another torch); placement would refuse it after the compile."""
    local = wheel_local_version(req)
    other = name_taken_elsewhere(req.wheelhouse, req.stack.name, req.recipe.dist_name, req.version.version, local)
    if other is not None:
        raise UsageError(f"{other.relative_to(req.wheelhouse)} already holds the file name this "
                         f"{req.stack.name} build would make ({req.recipe.dist_name} {req.version.version}"
                         f"+{local}), with another stack's bytes; an index serves one file per name: remove "
                         "it, or use another wheelhouse (BLACKWHEEL_WHEELHOUSE)")


def _build(req: BuildRequest, toolchain, inputs: dict, key: str, work: Path) -> BuildOutcome:
    rv = req.version
    ended = end_orphans()   # before the work folder is touched: a killed build's may still compile in it
    if ended:
        print(f"ended {len(ended)} processes a killed build left running", file=sys.stderr)
    started = time.time()
    prepared = prepare_tree(req, work / "src")
    check_build_requirements(req, prepared.tree)
    plan = job_plan(req)
    env = build_environment(req, toolchain, prepared, plan)
    print(f"building {req.recipe.name} {rv.version} for {req.target.name} "
          f"({req.recipe.arch.knob}={env[req.recipe.arch.knob]}); jobs: {plan.reason}", file=sys.stderr)
    out = work / "dist"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = req.workdir / "logs" / f"{req.recipe.name}-{key[:12]}.log"
    env, cache = start_compile_cache(req, env, toolchain, prepared.tree, plan, work=work)
    nvcc_flags = inputs.get("nvcc_flags", {})
    if nvcc_flags:
        print(f"nvcc {' '.join(next(iter(nvcc_flags.values())))} on {len(nvcc_flags)} units: on this "
              f"machine's CPUs the recorded profile is bound by its longest unit", file=sys.stderr)
    env = longest_first_env(req, env, work, nvcc_flags)   # last: the ninja stand-in must come first on PATH
    try:
        built = builder_for(req.recipe).build(req, prepared.tree, env, out, log)
    finally:
        cache_stats = cache.finish() if cache else None
    result = built.run
    unit_times = record_unit_times(req, work)
    missed = unflagged(work, nvcc_flags) if result.returncode == 0 else []
    if missed:   # the profile names units this build has not: it is from another layout of the package
        print(f"note: nvcc flags found no unit {', '.join(missed)} (recorded profile out of date?)", file=sys.stderr)
    if result.returncode != 0:
        raise BuildFailed(f"{req.recipe.name} build failed: {result.first_error or 'see the log'} "
                          f"(log: {log})")
    raw = _single_wheel(out, req.recipe)
    left_out = left_out_libraries(req, prepared.absent)
    check_expected_libraries(raw, req.recipe, left_out)
    wheel = retag_wheel(raw, wheel_local_version(req), out,
                        [torch_requirement(req.stack.torch)] if req.recipe.links_torch else [])
    verdict = verify_built(wheel, req, left_out)
    manifest: Manifest = {
        "package": req.recipe.name, "dist_name": req.recipe.dist_name,
        "version": wheel.name.split("-")[1], "stack": req.stack.name,
        "target": req.target.name, "target_devices": [str(cc) for cc in req.target.devices],
        "build_key": key, "inputs": inputs,
        **({"variants": req.variants} if rv.variants else {}),
        "sources": prepared.sources, "patches": prepared.patches, "toolchain": toolchain.to_dict(),
        **({"notes": prepared.notes} if prepared.notes else {}),
        "arch": {"knob": req.recipe.arch.knob, "value": env[req.recipe.arch.knob],
                 "archs": inputs["archs"]},
        "env": {k: env[k] for k in sorted(req.recipe.env)},
        "build": {"wall_s": round(result.wall_s, 1), "peak_mem_gib": round(result.peak_mem_bytes / 2**30, 2),
                  "jobs": plan.jobs, "nvcc_threads": plan.nvcc_threads, "jobs_reason": plan.reason,
                  "units": result.units_total, "log": str(log), "started": started,
                  "cache": cache_stats, "profile": _profile(unit_times, result, plan, cache_stats),
                  **({"nvcc_flags": {u: f for u, f in nvcc_flags.items() if u not in missed}} if nvcc_flags else {})},
        "verify": verdict,
        **built.manifest,   # the builder's own section (FlashInfer: the AOT modules and their arches)
    }
    final = place(wheel, manifest, req.wheelhouse, req.stack.name, req.target.name)
    print(f"built {final} in {result.wall_s:.0f}s, peak {result.peak_mem_bytes / 2**30:.1f} GiB", file=sys.stderr)
    return BuildOutcome(final, read_manifest(final), False)


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ---- plan: what a build would do, compiling nothing ----------------------------------------------------
def plan_package(req: BuildRequest, out: Path) -> dict | str:
    """The builder's plan (pip-wheel: the generated build file's arch flags and units); the tree is
    fetched and patched only if the builder asks for it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"plan-{req.recipe.name}-", dir=_mk(req.workdir)))
    try:
        return builder_for(req.recipe).plan(req, out.resolve(), lambda: _prepare_plan(req, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_plan(req: BuildRequest, work: Path) -> Prepared:
    toolchain = tc_mod.probe(req.python)
    tc_mod.check(toolchain, req.stack.torch, req.version.gcc, req.recipe.name)
    prepared = prepare_tree(req, work / "src")
    return Prepared(prepared.tree, build_environment(req, toolchain, prepared, job_plan(req)), work, toolchain)


def sdist_build_requirements(req: BuildRequest) -> list[str]:
    """The build requirements a request's sdist declares (fetched and extracted in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="bw-reqs-", dir=_mk(req.workdir)) as tmp:
        tree = safe_extract(req.fetcher.fetch(req.version.sdist), Path(tmp))
        return [*build_requirements(tree, req.recipe), *req.recipe.build_requires]

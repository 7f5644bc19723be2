"""Build-speed benchmark: our build against upstream's own command, same machine, same run.

    blackwheel bench-build flash-attn --target hopper [--units N] [--cores C [--together]]
                                     [--touch] --out DIR
    blackwheel bench-build flashinfer --target gb10 --kernels core --ours-only --touch
    blackwheel bench-build flash-attn --target hopper --units 8 --cores 8 --together --split-compile 2

Both runs compile the same patched sources from separate extractions, cold:
- **upstream**: the package's own defaults (flash-attn: ``MAX_JOBS`` from its setup.py formula,
  ``NVCC_THREADS`` 4, units in setup.py's order), no compiler cache;
- **ours**: jobs from cores and memory (``jobs.plan_jobs``), one nvcc thread for one arch, units
  slowest-first from the recorded profile (the ninja stand-in), sccache on an empty local store
  (what a first build gets), and the recipe's ``[split-compile]`` where a build on the run's CPUs
  would use it (``pipeline.build.split_compile_for``);
- **ours, one unit touched** (``--touch``): ours again on a fresh extraction at the same path with
  one compile unit's source changed, the store now warm: what a patch to one unit costs.

``--units N`` compiles a fixed subset (the same for every run: N units of the recorded profile
taken evenly from slowest to fastest, then in setup.py's order), for machines whose time does not
allow full builds; a subset build stops at the link. ``--cores C`` pins each run to C CPUs;
with ``--together`` upstream and ours run at the same time on two disjoint sets of C CPUs, so
both see the same machine. A run pinned to part of the machine counts its own peak memory (the
resident memory of the processes on its CPUs, ``progress.pinned_measure``), otherwise machine-wide. ``--ours-only`` skips upstream's command
(FlashInfer's own AOT entry point builds its full list, hours, not a kernel set).

``--split-compile N`` asks whether ``nvcc -split-compile=N`` on the long units shortens the bound: the
pair is then ours and ours with that flag on each unit the recorded profile finds longer than its
median (``pipeline.build.split_flags``), each with its own empty cache, and upstream is not run. The result says
whether both the wall and the longest unit dropped (the rule for adopting it).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

from ..toolchain import toolchain as tc_mod
from ..builders import builder_for
from ..builders.pip_wheel import pip_wheel_command
from ..pipeline.build import (BuildRequest, build_environment, job_plan, longest_first_env, prepare_tree,
                              profile_path, record_unit_times, recorded_units, split_compile_for,
                              split_flags, start_compile_cache, unflagged)
from ..toolchain.ccache import CacheConfig
from ..core.errors import UsageError
from ..core.fsutil import atomic_write_json, atomic_write_text
from ..toolchain.jobs import GIB, machine_resources
from ..toolchain.ninja import (SHIM_LOGS_ENV, SHIM_ONLY_ENV, build_profile,
                               read_ninja_log, unit_key, write_ninja_shim)
from ..toolchain.progress import run_logged

UPSTREAM_UNSET = ("MAX_JOBS", "NVCC_THREADS", "PYTORCH_NVCC", "BLACKWHEEL_NINJA_TIMES")


def flash_attn_default_jobs(cores: int, available_gib: float) -> int:
    """flash-attn 2.8.3 setup.py (NinjaBuildExtension): ``min(cpu_count // 2, free GiB / 9)``.

    Its ``os.cpu_count()`` ignores CPU affinity, so on a share of a machine the formula is
    evaluated here for the share and passed as ``MAX_JOBS``; on the whole machine it is left unset.

    >>> flash_attn_default_jobs(16, 120.0), flash_attn_default_jobs(32, 60.0), flash_attn_default_jobs(1, 4.0)
    (8, 6, 1)
    """
    return max(1, min(max(1, cores // 2), int(available_gib / 9)))


UPSTREAM_DEFAULT_JOBS = {"flash-attn": flash_attn_default_jobs}


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


def cpu_sets(available: list[int], cores: int, together: bool) -> tuple[frozenset[int], frozenset[int]]:
    """(upstream's CPUs, ours): the first ``cores`` CPUs each, or two disjoint sets with ``together``.

    >>> cpu_sets(list(range(8)), 4, True)
    (frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}))
    >>> cpu_sets(list(range(8)), 3, False)
    (frozenset({0, 1, 2}), frozenset({0, 1, 2}))
    """
    need = cores * (2 if together else 1)
    if cores < 1 or need > len(available):
        raise UsageError(f"--cores {cores}{' --together' if together else ''} needs {need} CPUs; "
                         f"this process may use {len(available)}")
    cpus = sorted(available)
    first = frozenset(cpus[:cores])
    return first, frozenset(cpus[cores:2 * cores]) if together else first


SOURCE_SUFFIXES = (".cu", ".cpp", ".cc", ".c")


def _sources_by_stem(tree: Path) -> dict[str, list[Path]]:
    """The tree's sources under the names their objects get: ``x`` for ``.../x.cu`` (torch
    extensions: ``x.o``) and ``csrc_norm`` for ``csrc/norm.cu`` (FlashInfer: ``csrc_norm.cuda.o``)."""
    index: dict[str, list[Path]] = {}
    for p in tree.rglob("*"):
        if p.suffix in SOURCE_SUFFIXES:
            for stem in {p.stem, p.relative_to(tree).with_suffix("").as_posix().replace("/", "_")}:
                index.setdefault(stem, []).append(p)
    return index


def _source_of(index: dict[str, list[Path]], unit: str) -> Path | None:
    """The one source compile unit ``unit`` comes from, or None (none, or several alike)."""
    found = index.get(unit_key(unit).removesuffix(".o").removesuffix(".cuda"), [])
    return found[0] if len(found) == 1 else None


def touch_unit(tree: Path, unit: str) -> Path:
    """Change the source of compile unit ``unit`` the way a one-unit patch would.

    The change must survive preprocessing (a comment would not), or the cache would hit.
    """
    source = _source_of(_sources_by_stem(tree), unit)
    if source is None:
        raise UsageError(f"unit {unit}: no single source named like it under {tree}")
    with source.open("a") as f:
        f.write("\nnamespace { [[maybe_unused]] constexpr int blackwheel_bench_touched = 1; }\n")
    return source


def unit_to_touch(unit_seconds: dict[str, float], tree: Path) -> str:
    """A typical unit: the one nearest the median time whose source is a file of the tree
    (FlashInfer's generated kernel instances live in the build folder, not in the tree).

    >>> import tempfile; t = Path(tempfile.mkdtemp()); _ = [(t / f"{n}.cu").write_text("") for n in "abc"]
    >>> unit_to_touch({"a.o": 1.0, "b.o": 5.0, "c.o": 9.0, "gen_x.cuda.o": 5.1}, t)
    'b.o'
    """
    units = [u for u in unit_seconds if u.endswith(".o")]          # not the links
    ranked = sorted(units, key=lambda u: unit_seconds[u])
    median = unit_seconds[ranked[len(ranked) // 2]] if ranked else 0.0
    index = _sources_by_stem(tree)
    for unit in sorted(ranked, key=lambda u: abs(unit_seconds[u] - median)):
        if _source_of(index, unit) is not None:
            return unit
    raise UsageError(f"no compile unit of this build has a single source file under {tree} to touch")


def unit_times(req: BuildRequest, work: Path, before: dict[str, float] | None = None) -> dict[str, float]:
    """Unit times of the build in ``work``: the ninja stand-in's logs, or the ninja log a builder
    keeps itself (FlashInfer's AOT folder). With ``before``, only what this run changed."""
    times = record_unit_times(req, work)
    for log in sorted(work.glob("flashinfer-aot/*/*/.ninja_log")):
        times.update({unit_key(k): v for k, v in read_ninja_log(log).items()})
    return {k: v for k, v in times.items() if before is None or before.get(k) != v}


class Run:
    """One build of the benchmark: its tree, environment, CPUs; ``go`` runs it and keeps the numbers."""

    def __init__(self, label: str, req: BuildRequest, work: Path, cpus: frozenset[int] | None,
                 units: list[str], nvcc_flags: dict[str, list[str]] | None = None):
        # FlashInfer keeps its module folder under the request's workdir: one per run folder
        req = replace(req, workdir=work)
        self.label, self.req, self.work, self.cpus, self.units = label, req, work, cpus, units
        self.nvcc_flags = nvcc_flags or {}    # {unit: flags} the ninja stand-in gives those units
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.tree: Path | None = None

    def go(self, prepare) -> None:
        """``prepare()`` -> (environment, compile-cache session or None), called on this run's CPUs."""
        try:
            if self.cpus is not None:   # this thread's CPUs; every process it starts (sccache too) inherits them
                os.sched_setaffinity(0, self.cpus)
            self.result = self._build(*prepare())
        except BaseException as exc:     # reported by the caller, after the other run ends
            self.error = exc

    def _build(self, env: dict[str, str], cache) -> dict:
        req, work = self.req, self.work
        if SHIM_LOGS_ENV not in env:   # upstream: the stand-in only keeps the log (and picks the subset)
            shim = write_ninja_shim(work / "shim", shutil.which("ninja", path=env["PATH"]) or "ninja").parent
            env = {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}", SHIM_LOGS_ENV: str(work / "ninja-logs")}
        if self.units:
            env[SHIM_ONLY_ENV] = ",".join(self.units)
        tree = next(p for p in (work / "src").iterdir() if p.is_dir())
        before = unit_times(req, work)
        try:   # on a pinned thread the builder's memory sampler counts only this run's processes
            if req.recipe.builder == "pip-wheel":
                result = run_logged(pip_wheel_command(req, tree, work / "dist"), tree, env, work / f"{self.label}.log",
                                    f"{self.label}: {req.recipe.name}", req.recipe.expect.get("compile-units"),
                                    req.live)
            else:   # its own builder (FlashInfer AOT)
                result = builder_for(req.recipe).build(req, tree, env, work / "dist", work / f"{self.label}.log").run
        finally:
            stats = cache.finish() if cache else None
        times = unit_times(req, work, before)
        if not self.units and result.returncode != 0:
            raise SystemExit(f"{self.label} build failed: {result.first_error} (log {result.log})")
        missing = sorted(set(self.units) - {unit_key(u) for u in times})
        if missing:   # a subset run that stopped before its units: not a measurement
            raise SystemExit(f"{self.label}: units not compiled: {', '.join(missing)} "
                             f"({result.first_error}; log {result.log})")
        flags = self.nvcc_flags
        missed = unflagged(work, flags)
        if missed:   # compiled as they were: the comparison would measure nothing
            raise SystemExit(f"{self.label}: nvcc flags not given to {', '.join(missed)} (log {result.log})")
        self.tree = tree
        return {"wall_s": round(result.wall_s, 1), "peak_mem_gib": round(result.peak_mem_bytes / GIB, 2),
                "units_compiled": len(times),
                "unit_seconds": {k: round(v, 1) for k, v in sorted(times.items())},
                "jobs": env.get("MAX_JOBS", "upstream default"), "nvcc_threads": env.get("NVCC_THREADS", "4 (default)"),
                "cpus": len(self.cpus) if self.cpus else machine_resources()[0],
                # torch puts sccache before the host compiler unless told not to (upstream is told)
                "host_compiles_cached": cache is not None and "TORCH_NO_COMPILER_WRAPPER" not in env,
                "cache": stats, "log": str(result.log), **({"nvcc_flags": flags} if flags else {})}


def _ours(req: BuildRequest, toolchain, run: Run, cache_dir: Path, touch: str | None = None):
    """Our build: jobs planned for the run's CPUs, sccache on ``cache_dir``, the longest-first stand-in
    (which also gives the run's ``nvcc_flags`` units their flags)."""
    def prepare():   # called on the run's pinned thread: the planner sees its CPUs only
        prepared = prepare_tree(req, run.work / "src")
        if touch:
            touch_unit(prepared.tree, touch)
        plan = job_plan(req)
        env = build_environment(req, toolchain, prepared, plan)
        env, cache = start_compile_cache(req, env, toolchain, prepared.tree, plan,
                                         CacheConfig(kind="local", directory=cache_dir), work=run.work)
        return longest_first_env(req, env, run.work, run.nvcc_flags), cache
    return prepare


def _upstream(req: BuildRequest, toolchain, run: Run):
    """Upstream's command with its own defaults (see ``UPSTREAM_DEFAULT_JOBS`` for a CPU share)."""
    def prepare():   # called on the run's pinned thread
        prepared = prepare_tree(req, run.work / "src")
        env = build_environment(req, toolchain, prepared, job_plan(req))
        env = {k: v for k, v in env.items() if k not in UPSTREAM_UNSET}
        env["TORCH_NO_COMPILER_WRAPPER"] = "1"   # no compiler cache, not even a ccache torch finds on PATH
        formula = UPSTREAM_DEFAULT_JOBS.get(req.recipe.name)
        if run.cpus and formula:
            cores, avail = machine_resources()
            env["MAX_JOBS"] = str(formula(cores, avail / GIB))
        return env, None
    return prepare


def _start(runs: list[tuple[Run, object]], together: bool) -> None:
    threads = [threading.Thread(target=r.go, args=(prepare,), name=r.label) for r, prepare in runs]
    for t in threads:
        t.start()
        if not together:
            t.join()
    for t in threads:
        t.join()
    failed = [r for r, _ in runs if r.error is not None]
    if failed:
        raise failed[0].error


def side_by_side(req: BuildRequest, units: int, cores: int | None = None, together: bool = False,
                 touch: bool = False, upstream: bool = True, save=lambda result: None,
                 split_compile: int = 0) -> dict:
    """The runs and their numbers; ``save(result)`` is also called before the touched rebuild.
    ``split_compile``: the pair is ours and ours with ``-split-compile`` on the long units."""
    toolchain = tc_mod.probe(req.python)
    tc_mod.check(toolchain, req.stack.torch, req.version.gcc, req.recipe.name)
    recorded = profile_path(req.recipe, req.version.version)
    profile = recorded_units(req)
    if (units or split_compile) and not profile:
        raise UsageError(f"--units and --split-compile need recorded unit times ({recorded}); "
                         f"run one full build first")
    subset = pick_units(profile, units) if units else []
    split = split_flags(profile, split_compile, subset) if split_compile else {}
    if split_compile and not split:
        raise UsageError(f"--split-compile: no unit of {'the subset' if subset else recorded} is longer "
                         f"than the profile's median")
    upstream = upstream and not split
    mine = sorted(os.sched_getaffinity(0))
    up_cpus, our_cpus = cpu_sets(mine, cores, together) if cores else (None, None)
    req.fetcher.fetch(req.version.sdist)   # once, before runs that extract it at the same time
    root = req.workdir / "bench-build"
    shutil.rmtree(root, ignore_errors=True)
    cache_dir = root / "sccache"
    theirs = Run("upstream", req, root / "upstream", up_cpus, subset)
    split_run = Run("ours-split", req, root / "ours-split", up_cpus, subset, nvcc_flags=split)
    # ours as a build on its CPUs would be, the recipe's [split-compile] included; plain against split
    ours_flags = {} if split else split_compile_for(req, len(our_cpus) if our_cpus else machine_resources()[0],
                                                    subset)
    ours = Run("ours", req, root / "ours", our_cpus, subset, nvcc_flags=ours_flags)
    # apart, the baseline first, so any warmth of the machine (page cache) favours it: upstream before
    # ours, ours before ours split
    baseline = [(theirs, _upstream(req, toolchain, theirs))] if upstream else []
    baseline.append((ours, _ours(req, toolchain, ours, cache_dir)))
    trial = [(split_run, _ours(req, toolchain, split_run, root / "sccache-split"))] if split else []
    _start(baseline + trial, together)
    runs = {"upstream": theirs.result if upstream else None, "ours": ours.result,
            **({"ours_split": split_run.result} if split else {})}
    result = _summary(req, runs, subset, cores, together, mine, our_cpus, upstream)
    if split:
        result["split_compile"] = split_verdict(ours.result, split_run.result, split_compile)
    if touch:
        save(result)
        touched_unit = unit_to_touch(ours.result["unit_seconds"], ours.tree)
        again = Run("ours-touched", req, root / "ours", our_cpus, subset, nvcc_flags=ours_flags)
        shutil.rmtree(again.work / "ninja-logs", ignore_errors=True)
        # the same path as the cold run: sccache hits only for sources at the same path
        _start([(again, _ours(req, toolchain, again, cache_dir, touch=touched_unit))], False)
        runs["ours_touched"] = again.result
        result["touched_unit"] = touched_unit
        result["ratio_touched_to_cold"] = round(again.result["wall_s"] / ours.result["wall_s"], 3)
    return result


def split_verdict(plain: dict, split: dict, n: int) -> dict:
    """Keep ``-split-compile=n`` only if the wall and the longest unit both dropped.

    >>> v = split_verdict({"wall_s": 100, "unit_seconds": {"a.o": 80, "x.so": 5}},
    ...                   {"wall_s": 90, "unit_seconds": {"a.o": 60, "x.so": 5}, "nvcc_flags": {"a.o": []}}, 2)
    >>> v["wall_ratio"], v["longest_unit_ratio"], v["keep"]
    (0.9, 0.75, True)
    """
    def longest(run: dict) -> float:    # compile units, not the links
        return max((t for u, t in run["unit_seconds"].items() if u.endswith(".o")), default=0.0)

    a, b = longest(plain), longest(split)
    return {"flag": f"-split-compile={n}", "units": sorted(split.get("nvcc_flags", {})),
            "wall_ratio": round(split["wall_s"] / plain["wall_s"], 3),
            "longest_unit_s": {"plain": a, "split": b},
            "longest_unit_ratio": round(b / a, 3) if a else None,
            "keep": split["wall_s"] < plain["wall_s"] and 0 < b < a}


def _summary(req: BuildRequest, runs: dict, subset: list[str], cores: int | None, together: bool,
             mine: list[int], our_cpus, upstream: bool) -> dict:
    machine_cores, avail = machine_resources()
    cores_used = len(our_cpus) if our_cpus else machine_cores
    ours = runs["ours"]
    prof = build_profile(ours["unit_seconds"], ours["wall_s"], cores_used, int(ours["peak_mem_gib"] * GIB),
                         ours["cache"])
    limit = prof["lower_bound_s"]
    return {"package": req.recipe.name, "version": req.version.version, "target": req.target.name,
            "kernel_set": req.kernel_set,
            "machine": {"cores": os.cpu_count(), "bench_cpus": len(mine), "available_gib": round(avail / GIB, 1), "host": os.uname().nodename,
                        "memory_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
            "cores_per_run": cores, "together": together, "subset": subset or "all units", "runs": runs,
            "ratio_ours_to_upstream": round(ours["wall_s"] / runs["upstream"]["wall_s"], 3) if upstream else None,
            "limit_s": limit, "ours_over_limit": round(ours["wall_s"] / limit, 3) if limit else None,
            "profile": prof, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def render(result: dict) -> str:
    runs = result["runs"]
    up, ours = runs["upstream"], runs["ours"]
    subset = result["subset"]
    what = "all units" if isinstance(subset, str) else f"{len(subset)} units: {', '.join(subset)}"
    cores = result.get("cores_per_run")
    how = (f"Each run pinned to {cores} CPUs{', both at the same time on disjoint CPUs' if result.get('together') else ''}."
           if cores else "Each run on the whole machine, one after the other.")
    rows = [f"| upstream's command | {up['wall_s']} | {up['peak_mem_gib']} | {up['jobs']} | {up['nvcc_threads']} | none |"
            ] if up else []
    flagged = ours.get("nvcc_flags") or {}    # the recipe's [split-compile], where ours used it
    given = (f" (`{' '.join(next(iter(flagged.values())))}` on {len(flagged)} units)" if flagged else "")
    rows += [f"| blackwheel, cold{given} | {ours['wall_s']} | {ours['peak_mem_gib']} | {ours['jobs']} | {ours['nvcc_threads']} "
            f"| {_cache_cell(ours.get('cache'))} |"]
    split, verdict = runs.get("ours_split"), result.get("split_compile")
    if split:
        rows.append(f"| blackwheel, `{verdict['flag']}` on {len(verdict['units'])} units | {split['wall_s']} "
                    f"| {split['peak_mem_gib']} | {split['jobs']} | {split['nvcc_threads']} | {_cache_cell(split.get('cache'))} |")
    touched = runs.get("ours_touched")
    if touched:
        rows.append(f"| blackwheel, `{result['touched_unit']}` touched | {touched['wall_s']} | {touched['peak_mem_gib']} "
                    f"| {touched['jobs']} | {touched['nvcc_threads']} | {_cache_cell(touched.get('cache'))} |")
    machine = result["machine"]
    kernels = f", kernel set `{result['kernel_set']}`" if result.get("kernel_set") else ""
    lines = [f"# Build speed: {result['package']} {result['version']} for {result['target']}{kernels}", "",
             f"Machine: {machine['cores']} CPUs, {machine.get('memory_total_gib', '?')} GiB total, "
             f"{machine['available_gib']} GiB available at the end. {how} Compiled: {what}.", "",
             "| run | wall s | peak GiB | jobs | nvcc threads | compiler cache |", "|---|---|---|---|---|---|", *rows, "",
             (f"Ours / upstream: **{result['ratio_ours_to_upstream']}**. " if up else "Upstream's command not run. ")
             + f"Limit for ours (sum of unit times / cores, or the longest unit): {result['limit_s']} s; "
               f"ours took {result['ours_over_limit']}x that."]
    if touched:
        lines.append(f"One unit touched, cache warm / cold: **{result['ratio_touched_to_cold']}**.")
    if verdict:
        longest = verdict["longest_unit_s"]
        lines += ["", f"`{verdict['flag']}` / plain: wall **{verdict['wall_ratio']}**, longest unit "
                  f"**{verdict['longest_unit_ratio']}** ({longest['plain']} s -> {longest['split']} s): "
                  + ("both dropped, so it may be kept" if verdict["keep"] else "not both dropped, so it is not kept")
                  + f". Split: {', '.join(verdict['units'])}."]
    prof = result.get("profile")
    if prof:
        lines += ["", f"Profile of ours: {prof['units']} units, {prof['unit_seconds_sum']} s of unit time on "
                  f"{prof['cores']} CPUs, longest {prof['longest_unit_s']} s, bound by {prof['bound_by']}, "
                  f"efficiency {prof['efficiency']}.", "", "| slowest units | s |", "|---|---|",
                  *[f"| {u['unit']} | {u['seconds']} |" for u in prof["slowest_units"][:5]]]
    return "\n".join(lines) + "\n"


def _cache_cell(stats: dict | None) -> str:
    if not stats:
        return "none"
    if "hits" in stats:
        return f"{stats['hits']} hits / {stats['misses']} misses"
    return stats.get("store", "?")


def bench_build(req: BuildRequest, out: Path, units: int = 0, cores: int | None = None, together: bool = False,
                touch: bool = False, ours_only: bool = False, split_compile: int = 0) -> str:
    """Measure, keep ``out/bench-build-<package>-<target>[-<kernels>].{json,md}`` after each run
    (a later run's failure leaves the earlier ones), and return the Markdown."""
    if together and not cores:
        raise UsageError("--together needs --cores (each run's share of the CPUs)")
    if together and ours_only:
        raise UsageError("--together compares with upstream; it cannot go with --ours-only")
    if split_compile and (split_compile < 2 or ours_only):
        raise UsageError("--split-compile N compares ours with ours split N ways: N >= 2, without --ours-only")
    stem = (f"bench-build-{req.recipe.name}-{req.target.name}" + (f"-{req.kernel_set}" if req.kernel_set else "")
            + (f"-split{split_compile}" if split_compile else ""))

    def save(result: dict) -> None:
        atomic_write_json(out / f"{stem}.json", result)
        atomic_write_text(out / f"{stem}.md", render(result))

    result = side_by_side(req, units, cores, together, touch, upstream=not ours_only, save=save,
                          split_compile=split_compile)
    save(result)
    return render(result)

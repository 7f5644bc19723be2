"""build-all: a stack for one target as one run, cheapest refusal first.

1. every request (recipe, target, kernel set) is made: a bad name stops before anything else;
2. every source of every package is fetched and verified (offline: checked), so a missing vLLM
   resource is named before flash-attn's hour of compiling, not after it;
3. an estimate from the recorded profiles (``recipes/profiles/``), for this machine;
4. the packages are built at once on one job budget (a jobserver every ninja joins: ``jobserver``),
   none of them needing another's wheel to compile (vLLM builds against the stack's FlashInfer
   *pin*); ``--one-at-a-time`` builds them in dependency order instead. With ``--keep-going`` a
   failure does not stop the others;
5. a closing table: version, wheel, wall, CPU-seconds, peak memory, cache hits, verify, built or reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import BlackwheelError, MissingOffline, SourceError
from ..toolchain.interrupt import SignalsRaise, descendants, end_processes
from ..toolchain.jobs import machine_resources, plan_jobs
from ..toolchain.jobserver import jobserver
from .build import build_package, profile_path


# ---- 2. sources first ------------------------------------------------------------------------------
def fetch_everything_first(requests) -> list[str]:
    """Fetch (or, offline, check) every source of every request before any compile.

    Returns the notes (optional resources left out); raises one line naming what is missing."""
    notes: list[str] = []
    missing: list[str] = []
    for req in requests:
        sources = req.recipe.sources_for(req.version.version, req.target, req.stack.torch)
        lacking, optional = req.fetcher.check(sources) if req.fetcher.offline else ([], [])
        missing += [f"{req.recipe.name}: {m}" for m in lacking]
        if lacking:
            continue
        for src in sources:
            try:
                _, note = req.fetcher.fetch_optional(src)
            except SourceError as exc:
                missing.append(f"{req.recipe.name}: {exc}")
                continue
            if note:
                notes.append(f"{req.recipe.name}: {note}")
    if missing:
        kind = MissingOffline if any(r.fetcher.offline for r in requests) else SourceError
        raise kind(f"sources missing before any compile: {'; '.join(missing)}")
    return notes


# ---- 3. the estimate -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    package: str
    seconds: float | None     # wall, the package alone on this machine
    basis: str                # what the number rests on, or why there is none
    cpu_s: float = 0.0        # its compile work: the sum of its units' seconds
    longest_s: float = 0.0    # its longest unit: no budget ends it sooner
    tail_s: float = 0.0       # alone, the part of its wall its jobs stood idle (1 - efficiency)


def estimate_request(req, cores: int, available_bytes: int) -> Estimate:
    """Wall seconds for one package on this machine, from its recorded profile.

    Unit times (one arch) are scaled by the target's arch count and laid on the planned jobs:
    ``max(sum / jobs / efficiency, longest)``, the efficiency being how full the recorded build kept
    its cores. A profile of
    only a total is scaled by cores. No profile, no number.
    """
    name = req.recipe.name
    path = profile_path(req.recipe, req.version.version)
    if not path.is_file():
        return Estimate(name, None, "no recorded profile")
    prof = json.loads(path.read_text())
    archs = len(req.recipe.arch.archs_for(req.target))
    unit_gib = float(req.recipe.expect.get("unit-memory-gib", 2.0))
    plan = plan_jobs(cores, available_bytes, int(unit_gib * 2**30), arch_count=archs)
    if prof.get("units"):
        times = list(prof["units"].values())
        per_arch = 1 if plan.nvcc_threads > 1 else archs
        efficiency = float(prof.get("efficiency", 1.0))   # how full the recorded build kept its cores
        cpu = sum(times) * archs
        longest = max(times) * per_arch
        seconds = max(cpu / plan.jobs / efficiency, longest)
        tail = cpu / plan.jobs * (1 / efficiency - 1)    # the part of its wall its jobs stood idle
        return Estimate(name, seconds, f"{len(times)} recorded units x {archs} arch(s) on {plan.jobs} jobs, "
                        f"at the recorded efficiency {efficiency}{_recorded_for(prof, req.target)}",
                        cpu, longest, tail)
    total = prof.get("total")
    if total:       # a total only: as if its cores were kept full (no tail known)
        cpu = total["wall_s"] * total["cores"] * archs / total.get("archs", 1)
        return Estimate(name, cpu / cores, f"one recorded build ({total['wall_s']} s on {total['cores']} cores), "
                                           f"scaled by cores{_recorded_for(prof, req.target)}", cpu)
    return Estimate(name, None, "profile holds no times")


def _recorded_for(profile: dict, target) -> str:
    """A profile measured for another target may time other units (vLLM's hopper build has FA3's)."""
    measured = profile.get("target")
    return f"; recorded for {measured}" if measured and measured != target.name else ""


def together_seconds(rows: list[Estimate], jobs: int) -> float:
    """The stack's wall when every package shares one budget of ``jobs``: all their work over the budget,
    plus one tail (alone, each package leaves jobs idle, mostly at its end; together the others' work
    fills all but one, taken here as the largest), or the longest unit of any package if that ends later."""
    work = sum(e.cpu_s for e in rows) / jobs + max((e.tail_s for e in rows), default=0.0)
    return max(work, max((e.longest_s for e in rows), default=0.0))


def estimate_text(requests, resources=None, together_jobs: int | None = None) -> str:
    """``about N min on this machine (C cores, M GiB)``, then one line per package."""
    resources = resources or machine_resources()
    return _estimate_lines([estimate_request(r, *resources) for r in requests], resources, together_jobs)


def stack_plan(requests, resources):
    """The one budget a build of these packages together gets (the heaviest unit of any sizes it)."""
    cores, avail = resources
    unit_gib = max(float(r.recipe.expect.get("unit-memory-gib", 2.0)) for r in requests)
    return plan_jobs(cores, avail, int(unit_gib * 2**30))


def _estimate_lines(rows: list[Estimate], resources, together_jobs: int | None = None) -> str:
    """The whole first, then each package as if alone. ``together_jobs``: the packages share one budget
    of that many jobs (the default build), else they build one after another."""
    cores, avail = resources
    known = [e for e in rows if e.seconds is not None]
    after = sum(e.seconds for e in known)
    where = f"on this machine ({cores} cores, {avail / 2**30:.0f} GiB free)"
    if together_jobs and len(rows) > 1:
        head = (f"estimate: about {together_seconds(known, together_jobs) / 60:.0f} min {where}, the packages "
                f"at once on one budget of {together_jobs} jobs (one after another: about {after / 60:.0f} min)")
    else:
        head = f"estimate: about {after / 60:.0f} min {where}" + (", packages one after another" if len(rows) > 1 else "")
    if len(known) < len(rows):
        head += f"; {len(rows) - len(known)} package(s) without a recorded profile not counted"
    lines = [head]
    for e in rows:
        when = f"~{e.seconds / 60:.0f} min" if e.seconds is not None else "unknown"
        lines.append(f"  {e.package:<12} {when:>9} alone  ({e.basis})")
    return "\n".join(lines)


# ---- 5. the closing table --------------------------------------------------------------------------
def outcome_row(req, outcome=None, error: BaseException | None = None) -> dict:
    """One line of the closing table, from a built or reused wheel's manifest, or from a failure."""
    row = {"package": req.recipe.name, "version": req.version.version}
    if error is not None:
        log = getattr(error, "log", None) or _log_of(str(error))
        return {**row, "result": "FAILED", "error": str(error), "log": log}
    m = outcome.manifest
    build = m.get("build", {})
    prof = build.get("profile") or {}
    cache = build.get("cache") or {}
    hits = cache.get("hits")
    return {**row, "result": "reused" if outcome.reused else "built", "wheel": Path(outcome.wheel).name,
            "wall_s": build.get("wall_s"), "cpu_s": prof.get("unit_seconds_sum"),
            "peak_gib": build.get("peak_mem_gib"),
            "cache_hits": f"{hits}/{cache.get('requests')}" if hits is not None else None,
            "verify": "ok" if m.get("verify", {}).get("ok") else "FAILED"}


def _log_of(message: str) -> str | None:
    return message.rsplit("(log: ", 1)[1].rstrip(")") if "(log: " in message else None


def closing_table(rows: list[dict]) -> str:
    head = ("package", "version", "result", "wheel", "wall s", "estimate s", "CPU s", "peak GiB",
            "cache hits", "verify")
    keys = ("package", "version", "result", "wheel", "wall_s", "estimate_s", "cpu_s", "peak_gib",
            "cache_hits", "verify")
    body = [[("-" if r.get(k) is None else str(r.get(k))) for k in keys] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body]
    for r in rows:
        if r["result"] == "FAILED":
            lines.append(f"{r['package']} failed: {r['error']}" + (f" (log: {r['log']})" if r.get("log") and
                                                                   "(log: " not in r["error"] else ""))
    return "\n".join(lines)


def stack_row(rows: list[dict], estimates: list[Estimate], wall_s: float, jobs: int | None) -> dict:
    """The closing table's last line: the stack's own wall, and the estimate of what was built."""
    built = [e for r, e in zip(rows, estimates) if r["result"] == "built" and e.seconds is not None]
    est = (together_seconds(built, jobs) if jobs else sum(e.seconds for e in built)) if built else None
    cpu = [r["cpu_s"] for r in rows if r.get("cpu_s") is not None]
    peaks = [r["peak_gib"] for r in rows if r.get("peak_gib") is not None]
    results = sorted({r["result"] for r in rows})
    return {"package": "(stack)", "version": "", "result": "/".join(results), "wheel": f"{len(rows)} packages",
            "wall_s": round(wall_s, 1), "estimate_s": round(est) if est is not None else None,
            "cpu_s": round(sum(cpu), 1) if cpu else None,
            # each package's own peak; built together their sum bounds the machine's, apart their largest
            "peak_gib": round(sum(peaks) if jobs else max(peaks), 1) if peaks else None,
            "cache_hits": None, "verify": "ok" if all(r.get("verify") == "ok" for r in rows) else "FAILED"}


# ---- the run ---------------------------------------------------------------------------------------
def build_stack(requests, keep_going: bool = False, build=None, together: bool = True,
                resources=None) -> tuple[list[dict], int]:
    """Sources first, an estimate, every package, then the closing table (printed). Returns (rows, rc)."""
    build = build or build_package
    for note in fetch_everything_first(requests):
        print(f"note: {note}", file=sys.stderr)
    resources = resources or machine_resources()
    estimates = [estimate_request(r, *resources) for r in requests]
    together = together and len(requests) > 1
    jobs = stack_plan(requests, resources).jobs if together else None
    print(_estimate_lines(estimates, resources, jobs), file=sys.stderr)
    started = time.monotonic()
    if together:
        rows = _build_together(requests, build, resources)
    else:
        rows = _build_one_after_another(requests, build, keep_going)
    for row, est in zip(rows, estimates):      # the estimate beside the actual, for what was built
        if row["result"] == "built" and est.seconds is not None:
            row["estimate_s"] = round(est.seconds)
    whole = [stack_row(rows, estimates, time.monotonic() - started, jobs)] if len(rows) > 1 else []
    print(closing_table(rows + whole))          # last, the whole stack: its wall against its estimate
    failed = [r for r in rows if r["result"] == "FAILED"]
    if failed and not keep_going:
        raise failed[0]["exception"]
    return rows, (1 if failed else 0)


def _build_one_after_another(requests, build, keep_going: bool) -> list[dict]:
    rows = []
    for req in requests:
        try:
            rows.append(outcome_row(req, build(req)))
        except BlackwheelError as exc:
            rows.append({**outcome_row(req, error=exc), "exception": exc})
            if not keep_going:
                break                           # stop at the first failure; the table says which
    return rows


def _build_together(requests, build, resources) -> list[dict]:
    """Every package at once, one jobserver for all their compiles; rows in the requests' order.

    The budget is planned for the whole machine with the heaviest unit of any package. A signal
    ends every build's processes (each build's own cleanup stops its compiler cache)."""
    plan = stack_plan(requests, resources)
    names = ", ".join(r.recipe.name for r in requests)
    print(f"building {names} at once on one budget of {plan.jobs} jobs ({plan.reason})", file=sys.stderr)
    with jobserver(plan.jobs, len(requests)) as shared:
        reqs = [dataclasses.replace(r, extra_env={**r.extra_env, **shared}, live=False) for r in requests]
        with ThreadPoolExecutor(len(reqs), thread_name_prefix="build") as pool:
            futures = [pool.submit(build, r) for r in reqs]
            try:
                with SignalsRaise():
                    for f in futures:
                        f.exception()          # waits; a signal arrives here, in the main thread
            except BaseException:
                end_processes(lambda: descendants([os.getpid()]))
                raise
    rows = []
    for req, f in zip(requests, futures):
        exc = f.exception()
        if exc is None:
            rows.append(outcome_row(req, f.result()))
        elif isinstance(exc, BlackwheelError):
            rows.append({**outcome_row(req, error=exc), "exception": exc})
        else:
            raise exc
    return rows

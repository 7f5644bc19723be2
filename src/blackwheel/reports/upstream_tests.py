"""test-upstream: a package's own test suite against the installed wheels.

Where the tests live is recipe data (``[versions.tests]``): the sdist (vLLM's ``tests/kernels``) or a
pinned git tree (FlashInfer keeps its tests out of the sdist). Only the ``tests/`` folder is laid out,
in a folder of its own, so ``import vllm`` in them finds the installed wheel, never the sdist's
sources beside them. The run sets the recipe's environment (FlashInfer: ``FLASHINFER_DISABLE_JIT=1``),
deselects by the kernel set's declared coverage (``upstream_coverage``), and reads pytest's JUnit XML
into counts per file: passed, failed, skipped, skipped for a missing module (FlashInfer's conftest
names the module it lacked: that list is also the trace of what its dispatcher asked for), deselected.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Mapping

from ..core.errors import UsageError
from ..core.recipe import Recipe
from ..sources.fetch import safe_extract
from .upstream_coverage import COVERAGE_ENV, REPORT_ENV
from .upstream_env import (DEADLINE_ENV, DEADLINE_REASON, NOT_RUN_OUT_ENV, ONLY_IDS_ENV, UNCOLLECTED_OUT_ENV,
                           VANISHED_OUT_ENV)
from .upstream_trace import TRACE_ENV, TRACE_OUT_ENV, merge

MISSING_MODULE = re.compile(r"missing JIT cache for module:?\s*(\S+)")
# a result that ran out of GPU memory judges the machine's load, not the kernel: counted apart too
# (torch's OutOfMemoryError, a CUDA "out of memory" status, FlashInfer's conftest "Skipping due to OOM")
OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|out of memory|Skipping due to OOM", re.IGNORECASE)
SRC_ROOT = Path(__file__).resolve().parents[2]     # so the test Python finds the coverage plugin
# a file's counts before any test is counted; each file takes a copy (other counts join when they occur)
EMPTY_COUNTS = {"passed": 0, "failed": 0, "skipped": 0, "skipped_missing_module": 0}


def coverage_of(recipe: Recipe, kernel_set: str | None) -> dict:
    """``{file glob: {parameter: values}}`` of a kernel set and the sets it includes."""
    sets = recipe.data.get("kernel-sets", {})
    if kernel_set is None:
        return {}
    if kernel_set not in sets:
        raise UsageError(f"{recipe.name} has no kernel set {kernel_set!r}; sets: {', '.join(sorted(sets))}")
    merged: dict = {}
    for name in [*sets[kernel_set].get("include", []), kernel_set]:
        for glob, table in sets[name].get("coverage", {}).items():
            merged.setdefault(glob, {}).update(table)
    return merged


def lay_out_tests(tree: Path, dest: Path) -> Path:
    """Copy ``tree/tests`` to ``dest/tests`` (fresh): the tests alone, no package sources beside them."""
    if not (tree / "tests").is_dir():
        raise UsageError(f"{tree} has no tests/ folder")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(tree / "tests", dest / "tests", symlinks=True)
    return dest


def parse_junit(path: Path) -> dict:
    """``{"files": {file: counts}, "missing_modules": [...]}`` from pytest's JUnit XML."""
    files: dict[str, dict[str, int]] = {}
    missing: set[str] = set()
    reasons: dict[str, dict[str, int]] = {}
    failures: dict[str, dict[str, int]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        # a file that failed to collect has no class: pytest puts its dotted path in the name
        dotted = case.get("classname") or case.get("name", "")
        name = case.get("file") or dotted.replace(".", "/") + ".py"
        name = name[name.find("tests/"):] if "tests/" in name else name   # as the recipe names it
        counts = files.setdefault(name, dict(EMPTY_COUNTS))
        skipped = case.find("skipped")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            reason = _failure_reason(bad.get("message", ""), bad.text or "")
            if OUT_OF_MEMORY.search(reason):
                counts["out_of_memory"] = counts.get("out_of_memory", 0) + 1
            per_file = failures.setdefault(name, {})
            per_file[reason] = per_file.get(reason, 0) + 1
        elif skipped is not None:
            message = skipped.get("message", "")
            m = MISSING_MODULE.search(f"{message} {skipped.text or ''}")
            if m:
                counts["skipped_missing_module"] += 1
                missing.add(m.group(1))
            elif DEADLINE_REASON in message:
                counts["not_run_deadline"] = counts.get("not_run_deadline", 0) + 1
            else:
                counts["skipped"] += 1
                reason = _skip_reason(message)
                if OUT_OF_MEMORY.search(reason):
                    counts["out_of_memory"] = counts.get("out_of_memory", 0) + 1
                per_file = reasons.setdefault(name, {})
                per_file[reason] = per_file.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {"files": files, "missing_modules": sorted(missing), "skip_reasons": reasons,
            "failure_reasons": failures}


def _failure_reason(message: str, text: str) -> str:
    """A failure as one short line: the first ``E   ...`` line of pytest's text (the exception),
    else its message, so that failures of one cause count together."""
    errors = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    line = errors[0] if errors else " ".join(message.split())
    return line[:160] or "(no message)"


def _skip_reason(message: str) -> str:
    """A skip message as one short line (pytest prefixes the location: ``file.py:12: why``)."""
    text = " ".join(message.split())
    text = re.sub(r"^\S+\.py:\d+: ", "", text)
    return text[:160] or "(no reason given)"


def run_upstream_tests(recipe: Recipe, version: str, fetcher, work: Path, python: str = sys.executable,
                       kernel_set: str | None = None, pytest_args: list[str] = (),
                       only: list[str] = (), deadline_s: float | None = None,
                       rest_of: Mapping | None = None) -> dict:
    """Fetch the pinned tests, run them in ``python`` against what is installed, return the counts.

    ``only``: globs that keep some of the recipe's test files (a shorter run). ``deadline_s``: tests
    not started that many seconds after pytest starts are skipped and counted as not run, so a run
    with a time limit ends with its counts (``upstream_deadline``). Each run lays out and writes in a
    folder of its own under ``work``, so runs at once do not mix their files.

    ``rest_of``: an earlier result that a deadline left partial; this run runs only the tests it did
    not (its ``not_run_ids``) and returns the two runs' counts together. Ids of those that collection no
    longer has are named (``vanished_ids``): they ran in neither run, so no count holds them."""
    rv = recipe.version(version)
    if rv.tests is None:
        raise UsageError(f"recipe {recipe.name} {version} names no upstream tests ([versions.tests])")
    paths = [p for p in rv.tests.paths if not only or any(fnmatch.fnmatch(p, g) for g in only)]
    if not paths:
        raise UsageError(f"--only {' '.join(only)} keeps none of {', '.join(rv.tests.paths)}")
    only_ids = None
    if rest_of is not None:
        ran = (rest_of.get("package"), rest_of.get("version"), rest_of.get("kernel_set"))
        if ran != (recipe.name, version, kernel_set):
            raise UsageError(f"--rest-of: that run was of {ran[0]} {ran[1]} with kernel set {ran[2]!r}, "
                             f"not {recipe.name} {version} with {kernel_set!r}")
        only_ids = rest_of.get("not_run_ids") or []
        if not only_ids:
            raise UsageError("--rest-of: that run left no test unrun")
        paths = sorted({i.split("::", 1)[0] for i in only_ids})
    work.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    # the sdist is extracted per run: one tree shared by runs at once was rewritten (extracting merges)
    # under a run copying its tests out of it, which then collected nothing
    unpacked = Path(tempfile.mkdtemp(prefix="sdist-", dir=work)) if rv.tests.source is None else None
    try:
        tree = safe_extract(fetcher.fetch(rv.sdist), unpacked) if unpacked else fetcher.fetch(rv.tests.source)
        result = _run_laid_out(recipe, rv, version, tree, run, python, kernel_set, pytest_args, paths,
                               deadline_s, only_ids)
        return result if rest_of is None else combine_runs(rest_of, result)
    finally:
        shutil.rmtree(run, ignore_errors=True)
        if unpacked:
            shutil.rmtree(unpacked, ignore_errors=True)


def _run_laid_out(recipe, rv, version, tree, run: Path, python, kernel_set, pytest_args, paths,
                  deadline_s, only_ids=None) -> dict:
    where = lay_out_tests(tree, run)
    junit, deselected_json, trace_json = run / "junit.xml", run / "deselected.json", run / "trace.json"
    not_run_txt, only_txt, vanished_txt = run / "not-run.txt", run / "only-ids.txt", run / "vanished.txt"
    uncollected_txt = run / "uncollected.txt"
    if only_ids:
        only_txt.write_text("".join(f"{i}\n" for i in only_ids))
    coverage = coverage_of(recipe, kernel_set)
    env = {**os.environ, **rv.tests.env, COVERAGE_ENV: json.dumps(coverage), REPORT_ENV: str(deselected_json),
           TRACE_OUT_ENV: str(trace_json), **({TRACE_ENV: rv.tests.trace} if rv.tests.trace else {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC_ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONDONTWRITEBYTECODE": "1",
           NOT_RUN_OUT_ENV: str(not_run_txt),
           **({ONLY_IDS_ENV: str(only_txt), VANISHED_OUT_ENV: str(vanished_txt),
               UNCOLLECTED_OUT_ENV: str(uncollected_txt)} if only_ids else {}),
           **({DEADLINE_ENV: str(time.time() + deadline_s)} if deadline_s else {})}
    cmd = [python, "-m", "pytest", *paths, "-p", "blackwheel.reports.upstream_coverage",
           "-p", "blackwheel.reports.upstream_trace", "-p", "blackwheel.reports.upstream_deadline",
           "-p", "no:cacheprovider", f"--junitxml={junit}", "-q",
           # a file that does not import is that file's failure, not the end of the others' run
           "--continue-on-collection-errors", *pytest_args]
    proc = subprocess.run(cmd, cwd=where, env=env)
    if not junit.is_file():
        raise UsageError(f"upstream tests of {recipe.name} did not run (pytest exit {proc.returncode}); "
                         f"command: {' '.join(cmd)}")
    result = parse_junit(junit)
    deselected = json.loads(deselected_json.read_text()) if deselected_json.is_file() else {}
    for name, n in deselected.items():
        result["files"].setdefault(name, dict(EMPTY_COUNTS))["deselected"] = n
    trace = merge(trace_json)
    source = rv.tests.source.label if rv.tests.source else rv.sdist.label
    not_run = sum(c.get("not_run_deadline", 0) for c in result["files"].values())
    not_run_ids = _ids_in(not_run_txt)
    vanished_ids = _ids_in(vanished_txt)    # listed to run, but collection no longer has them
    uncollected_ids = _ids_in(uncollected_txt)   # listed to run, but their file did not import (counted failed)
    return {"package": recipe.name, "version": version, "tests_from": source, "kernel_set": kernel_set,
            "env": rv.tests.env, "coverage": coverage, "pytest_exit": proc.returncode, **result,
            **({"partial": f"{not_run} test(s) not run: the {deadline_s:g} s deadline passed"} if not_run else {}),
            "first_result_s": trace.get("first_result_s", {}),
            **({"trace": {"via": rv.tests.trace, "modules": trace.get("modules", {})}} if rv.tests.trace else {}),
            **({"not_run_ids": not_run_ids} if not_run_ids else {}),
            **({"vanished_ids": vanished_ids} if vanished_ids else {}),
            **({"uncollected_ids": uncollected_ids} if uncollected_ids else {})}


def _ids_in(path: Path) -> list[str]:
    """The node ids a plugin wrote to ``path``, one a line (none where it wrote no file)."""
    return sorted(set(path.read_text().split("\n")) - {""}) if path.is_file() else []


def combine_runs(first: Mapping, rest: Mapping) -> dict:
    """A partial run and the run of what it left (``rest_of``), as one result: counts added per file,
    except what was not run (the later run's word) and what coverage deselected (the first run's: the
    later one collected only the tests left)."""
    out = copy.deepcopy(dict(first))
    for name, counts in rest["files"].items():
        have = out["files"].setdefault(name, dict(EMPTY_COUNTS))
        for key, n in counts.items():
            if key not in ("deselected", "not_run_deadline"):
                have[key] = have.get(key, 0) + n
        have.pop("not_run_deadline", None)
        if counts.get("not_run_deadline"):
            have["not_run_deadline"] = counts["not_run_deadline"]
    for key in ("skip_reasons", "failure_reasons"):
        for name, reasons in rest.get(key, {}).items():
            mine = out.setdefault(key, {}).setdefault(name, {})
            for why, n in reasons.items():
                mine[why] = mine.get(why, 0) + n
    out["missing_modules"] = sorted(set(out["missing_modules"]) | set(rest["missing_modules"]))
    if "trace" in rest:
        modules = out.setdefault("trace", {"via": rest["trace"]["via"], "modules": {}})["modules"]
        for name, seen in rest["trace"]["modules"].items():
            modules[name] = {"aot": seen.get("aot"), "calls": modules.get(name, {}).get("calls", 0) + seen.get("calls", 0)}
    out["pytest_exit"] = rest["pytest_exit"] if first["pytest_exit"] in (0, 5) else first["pytest_exit"]
    out["runs"] = first.get("runs", 1) + 1
    for key in ("vanished_ids", "uncollected_ids"):
        ids = sorted({*first.get(key, []), *rest.get(key, [])})
        if ids:     # each run's list: a later run is given only what the one before left, so none twice
            out[key] = ids
    out.pop("partial", None)
    out.pop("not_run_ids", None)
    if rest.get("partial"):
        out["partial"], out["not_run_ids"] = rest["partial"], rest.get("not_run_ids", [])
    return out


def report_text(result: dict) -> str:
    head = ("file", "passed", "failed", "skipped", "skipped: missing module", "deselected by coverage")
    keys = ("passed", "failed", "skipped", "skipped_missing_module", "deselected")
    rows = [[name, *(str(c.get(k, 0)) for k in keys)] for name, c in sorted(result["files"].items())]
    totals = ["total", *(str(sum(c.get(k, 0) for c in result["files"].values())) for k in keys)]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    lines += [f"| {' | '.join(r)} |" for r in [*rows, totals]]
    if result["missing_modules"]:
        lines.append("missing modules: " + ", ".join(result["missing_modules"]))
    if result.get("runs"):
        lines.append(f"counts of {result['runs']} runs together: each later one ran what the one before left")
    if result.get("partial"):
        lines.append("PARTIAL: " + result["partial"] + " (--rest-of runs them)")
    if result.get("vanished_ids"):
        ids = result["vanished_ids"]
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        lines.append(f"VANISHED: {len(ids)} listed test(s) no longer exist (renamed or removed upstream): "
                     f"not run, in no count: {', '.join(ids[:3])}{more}")
    if result.get("uncollected_ids"):
        ids = result["uncollected_ids"]
        more = f" and {len(ids) - 3} more" if len(ids) > 3 else ""
        lines.append(f"NOT COLLECTED: {len(ids)} listed test(s) not run: their file did not import (counted once "
                     f"as that file's failure): {', '.join(ids[:3])}{more}")
    oom = sum(c.get("out_of_memory", 0) for c in result["files"].values())
    if oom:
        lines.append(f"OUT OF MEMORY: {oom} of the failed and skipped ran out of GPU memory; they judge the "
                     f"GPU's load (other processes, too many pytest workers), not the kernels: rerun alone")
    for name, reasons in sorted(result.get("failure_reasons", {}).items()):
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"failed in {name}: " + "; ".join(f"{n} x {why}" for why, n in top))
    for name, reasons in sorted(result.get("skip_reasons", {}).items()):
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"skipped in {name}: " + "; ".join(f"{n} x {why}" for why, n in top))
    return "\n".join(lines)

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

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping

from ..core.errors import UsageError
from ..core.recipe import Recipe
from ..sources.fetch import safe_extract
from ..builders.flashinfer_aot import module_names, target_archs
from .upstream_coverage import COVERAGE_ENV, REPORT_ENV, excluded
from .upstream_trace import TRACE_ENV, TRACE_OUT_ENV, merge

MISSING_MODULE = re.compile(r"missing JIT cache for module:?\s*(\S+)")
SRC_ROOT = Path(__file__).resolve().parents[2]     # so the test Python finds the coverage plugin


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
    for case in ET.parse(path).getroot().iter("testcase"):
        name = (case.get("file") or case.get("classname", "").replace(".", "/") + ".py")
        name = name[name.find("tests/"):] if "tests/" in name else name   # as the recipe names it
        counts = files.setdefault(name, {"passed": 0, "failed": 0, "skipped": 0, "skipped_missing_module": 0})
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif skipped is not None:
            m = MISSING_MODULE.search(f"{skipped.get('message', '')} {skipped.text or ''}")
            if m:
                counts["skipped_missing_module"] += 1
                missing.add(m.group(1))
            else:
                counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"files": files, "missing_modules": sorted(missing)}


def run_upstream_tests(recipe: Recipe, version: str, fetcher, work: Path, python: str = sys.executable,
                       kernel_set: str | None = None, pytest_args: list[str] = (),
                       only: list[str] = ()) -> dict:
    """Fetch the pinned tests, run them in ``python`` against what is installed, return the counts.

    ``only``: globs that keep some of the recipe's test files (a shorter run)."""
    rv = recipe.version(version)
    if rv.tests is None:
        raise UsageError(f"recipe {recipe.name} {version} names no upstream tests ([versions.tests])")
    paths = [p for p in rv.tests.paths if not only or any(fnmatch.fnmatch(p, g) for g in only)]
    if not paths:
        raise UsageError(f"--only {' '.join(only)} keeps none of {', '.join(rv.tests.paths)}")
    if rv.tests.source is None:
        tree = safe_extract(fetcher.fetch(rv.sdist), work / "sdist")
    else:
        tree = fetcher.fetch(rv.tests.source)
    where = lay_out_tests(tree, work / "run")
    junit, deselected_json, trace_json = work / "junit.xml", work / "deselected.json", work / "trace.json"
    for stale in (junit, deselected_json, *work.glob(trace_json.name + "*")):
        stale.unlink(missing_ok=True)
    coverage = coverage_of(recipe, kernel_set)
    env = {**os.environ, **rv.tests.env, COVERAGE_ENV: json.dumps(coverage), REPORT_ENV: str(deselected_json),
           TRACE_OUT_ENV: str(trace_json), **({TRACE_ENV: rv.tests.trace} if rv.tests.trace else {}),
           "PYTHONPATH": os.pathsep.join(p for p in (str(SRC_ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [python, "-m", "pytest", *paths, "-p", "blackwheel.reports.upstream_coverage", "-p", "blackwheel.reports.upstream_trace",
           "-p", "no:cacheprovider", f"--junitxml={junit}", "-q", *pytest_args]
    proc = subprocess.run(cmd, cwd=where, env=env)
    if not junit.is_file():
        raise UsageError(f"upstream tests of {recipe.name} did not run (pytest exit {proc.returncode}); "
                         f"command: {' '.join(cmd)}")
    result = parse_junit(junit)
    deselected = json.loads(deselected_json.read_text()) if deselected_json.is_file() else {}
    for name, n in deselected.items():
        result["files"].setdefault(name, {"passed": 0, "failed": 0, "skipped": 0,
                                          "skipped_missing_module": 0})["deselected"] = n
    trace = merge(trace_json)
    source = rv.tests.source.label if rv.tests.source else rv.sdist.label
    return {"package": recipe.name, "version": version, "tests_from": source, "kernel_set": kernel_set,
            "env": rv.tests.env, "coverage": coverage, "pytest_exit": proc.returncode, **result,
            "first_result_s": trace.get("first_result_s", {}),
            **({"trace": {"via": rv.tests.trace, "modules": trace.get("modules", {})}} if rv.tests.trace else {})}


def report_text(result: dict) -> str:
    head = ("file", "passed", "failed", "skipped", "skipped: missing module", "deselected by coverage")
    keys = ("passed", "failed", "skipped", "skipped_missing_module", "deselected")
    rows = [[name, *(str(c.get(k, 0)) for k in keys)] for name, c in sorted(result["files"].items())]
    totals = ["total", *(str(sum(c.get(k, 0) for c in result["files"].values())) for k in keys)]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    lines += [f"| {' | '.join(r)} |" for r in [*rows, totals]]
    if result["missing_modules"]:
        lines.append("missing modules: " + ", ".join(result["missing_modules"]))
    return "\n".join(lines)


def trace_gaps(recipe: Mapping, trace: Mapping, set_name: str = "default") -> list[str]:
    """What a recorded trace (``recipes/traces/*.json``) asked for that the set lacks for the trace's
    target, one line each. A module outside the set is fine only when every test that asked for it
    is excluded by the set's declared coverage (``exclude-tests``)."""
    archs = target_archs(recipe, trace["target"])
    held = set(module_names(recipe, set_name, archs))
    sets = recipe.get("kernel-sets", {})
    tables = [t for n in [*sets[set_name].get("include", []), set_name]
              for t in sets[n].get("coverage", {}).items()]
    gaps = []
    for name, entry in trace.get("modules", {}).items():
        if name in held:
            continue
        askers = entry.get("asked_by", [])
        covered = [f"{f}::{t}" for f in entry.get("files", []) for t in askers
                   if not any(fnmatch.fnmatch(f, g) and excluded(t, rules) for g, rules in tables)]
        if not askers or covered:
            gaps.append(f"{name} (asked by {', '.join(covered) or ', '.join(entry.get('files', []))}) "
                        f"is not in set {set_name!r} for {trace['target']}")
    return gaps

"""pytest plugin: record which compiled modules upstream's tests ask for, and how soon each file answers.

Loaded into upstream's own test run (``-p blackwheel.reports.upstream_trace``) by ``test-upstream``.
``BLACKWHEEL_TRACE`` names a method, ``module:Class.method`` (FlashInfer:
``flashinfer.jit.core:JitSpec.build_and_load``), that every module load goes through; each call's
``self.name`` is recorded, with whether a prebuilt (AOT) copy was there (``is_aot``). That list is
the trace of what the pinned version's dispatcher selects on this GPU, hits and misses alike (a miss
ends its test, so the skip reasons alone name only the first module a test lacked).
``BLACKWHEEL_TRACE_OUT`` gets ``{"modules": {name: {"aot": bool, "calls": n}}, "first_result_s":
{file: seconds}}``: per test file, from the start of its first test to its first passing one (module
loading included). Imports nothing heavy; patches nothing when the variable is unset. A program, not a test run, calls
``install`` and ``write_recorded`` itself (the vLLM end-to-end worker does).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from pathlib import Path

TRACE_ENV = "BLACKWHEEL_TRACE"
TRACE_OUT_ENV = "BLACKWHEEL_TRACE_OUT"

_modules: dict[str, dict] = {}
_first_start: dict[str, float] = {}
_first_result: dict[str, float] = {}


def _record(name: str, aot: bool) -> None:
    entry = _modules.setdefault(name, {"aot": aot, "calls": 0})
    entry["calls"] += 1


def install(target: str) -> None:
    """Wrap ``module:Class.method`` so each call records ``self.name`` (and ``self.is_aot``)."""
    module_name, _, attr = target.partition(":")
    cls_name, _, method = attr.partition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    original = getattr(cls, method)
    if getattr(original, "_blackwheel_traced", False):
        return

    @functools.wraps(original)
    def traced(self, *args, **kwargs):
        _record(str(self.name), bool(getattr(self, "is_aot", False)))
        return original(self, *args, **kwargs)

    traced._blackwheel_traced = True
    setattr(cls, method, traced)


def write_recorded(path: str | Path) -> None:
    """Outside pytest (a program that called ``install``, e.g. vLLM's engine in one process): the
    modules recorded so far, in the same form a test run writes."""
    _write(Path(path), {})


def _write(path: Path, first_result: dict) -> None:
    path.write_text(json.dumps({"modules": _modules, "first_result_s": first_result}, indent=1, sort_keys=True))


def _file_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return path[path.find("tests/"):] if "tests/" in path else path


def pytest_configure(config):
    if os.environ.get(TRACE_ENV):
        install(os.environ[TRACE_ENV])


def pytest_runtest_setup(item):
    _first_start.setdefault(_file_of(item.nodeid), time.monotonic())


def pytest_runtest_logreport(report):
    name = _file_of(report.nodeid)
    if report.when == "call" and report.passed and name not in _first_result and name in _first_start:
        _first_result[name] = round(time.monotonic() - _first_start[name], 3)


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get(TRACE_OUT_ENV)
    if out:   # pytest-xdist: each worker writes its own file beside it (``merge`` reads them all)
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        _write(Path(f"{out}.{worker}" if worker else out), _first_result)


def merge(out: Path) -> dict:
    """One trace from ``out`` and its per-worker siblings: calls summed, earliest first result kept."""
    modules: dict[str, dict] = {}
    first: dict[str, float] = {}
    for path in sorted(out.parent.glob(out.name + "*")):
        part = json.loads(path.read_text())
        for name, entry in part.get("modules", {}).items():
            have = modules.setdefault(name, {"aot": entry["aot"], "calls": 0})
            have["calls"] += entry["calls"]
            have["aot"] = have["aot"] or entry["aot"]
        for name, seconds in part.get("first_result_s", {}).items():
            first[name] = min(seconds, first.get(name, seconds))
    return {"modules": modules, "first_result_s": first}

"""Traces: which compiled modules a workload asked for (``recipes/traces/*.json``), kept as data.

A trace is recorded on a GPU (``upstream_trace`` inside upstream's tests, or the vLLM end-to-end
worker), checked against a kernel set (``trace_gaps``, in CI) or a built wheel (``verify --trace``),
grown by later runs (``add_runs``), and carried to a target whose GPU it was not taken on by the pinned version's
own dispatch rule (``derive_for_target``).

The file: ``{package, version, target, archs, how, files, not_traced, modules: {name: {prebuilt?,
files, asked_by?}}}``. ``prebuilt``: the wheel held the module when it was asked for (absent in a
derived trace); ``asked_by``: for a module the wheel lacked, the tests that asked (their skip reason).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path
from typing import Iterable, Mapping

from ..builders.flashinfer_aot import module_names, target_archs, wheel_module_names
from ..core.errors import RecipeError, UsageError
from ..core.fsutil import atomic_write_text
from ..core.recipe import load_recipe
from .upstream_coverage import excluded


def trace_gaps(recipe: Mapping, trace: Mapping, set_name: str = "default",
               held: Iterable[str] | None = None) -> list[str]:
    """What a recorded trace (``recipes/traces/*.json``) asked for that the set lacks for the trace's
    target, one line each. A module outside the set is fine only when every test that asked for it
    is excluded by the set's declared coverage (``exclude-tests``). ``held``: the modules a built
    wheel holds (``wheel_module_names``), instead of those the set's recipe predicts."""
    where = f"set {set_name!r}" if held is None else "the wheel"
    held = set(module_names(recipe, set_name, target_archs(recipe, trace["target"])) if held is None else held)
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
                        f"is not in {where} for {trace['target']}")
    return gaps


def read_trace(path: Path, target_name: str) -> dict:
    """A recorded trace for ``target_name``, with the recipe data it is checked against under
    ``"_recipe"``; every defect of the file is a one-line error, before any wheel is read."""
    try:
        trace = json.loads(Path(path).read_text())
        package, version, traced_for = trace["package"], trace["version"], trace["target"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--trace {path}: not a readable trace ({exc})") from None
    if traced_for != target_name:
        raise UsageError(f"--trace {path}: recorded for target {traced_for!r}, not {target_name!r}")
    try:
        recipe = load_recipe(package)
    except RecipeError as exc:
        raise UsageError(f"--trace {path}: {exc}") from None
    if version not in [v.version for v in recipe.versions]:
        raise UsageError(f"--trace {path}: {package} {version} is not a version of its recipe")
    return {**trace, "_recipe": recipe.data}


def trace_verdict(trace: Mapping, object_paths: Iterable[str]) -> tuple[list[str], str]:
    """For a built wheel's object paths: a failure line for each traced module the wheel lacks (outside
    the set's declared coverage excepted), and a note on the modules it holds beyond the trace."""
    held = wheel_module_names(object_paths)
    gaps = trace_gaps(trace["_recipe"], trace, held=held)
    extra = sorted(held - set(trace.get("modules", {})))
    note = (f"trace {trace['package']} {trace['version']} {trace['target']}: {len(trace.get('modules', {}))} "
            f"module(s) asked for, {len(gaps)} missing; the wheel holds {len(extra)} more")
    return gaps, note


def add_runs(trace: Mapping, results: Iterable[Mapping]) -> dict:
    """``trace`` grown by later runs: test-upstream results (their ``files`` and ``trace``), or a program's
    record in the same shape. Each module gains the run's files; ``prebuilt`` is the latest run's word
    (a module added to the set since is prebuilt now, and no longer needs the tests that missed it).
    A file a run traced leaves ``not_traced``. Returns a new trace; ``trace`` is not changed."""
    out = copy.deepcopy(dict(trace))
    out.setdefault("modules", {})
    for result in results:
        recorded = (result.get("trace") or {}).get("modules")
        if recorded is None:
            raise UsageError("a run without a trace cannot grow one (was BLACKWHEEL_TRACE set?)")
        files = sorted(result.get("files", {}))
        for name, seen in recorded.items():
            entry = out["modules"].setdefault(name, {"files": []})
            entry["files"] = sorted(set(entry.get("files", [])) | set(files))
            entry["prebuilt"] = bool(seen.get("aot"))
            if entry["prebuilt"]:
                entry.pop("asked_by", None)
        out["files"] = sorted(set(out.get("files", [])) | set(files))
        out["not_traced"] = [n for n in out.get("not_traced", []) if n.split(" ", 1)[0] not in files]
    out["modules"] = dict(sorted(out["modules"].items()))
    return out


# FlashInfer's dispatch rule, as its pinned versions have it: flashinfer/utils.py
# determine_attention_backend returns "fa3" only when is_sm90a_supported(device); the FA3 module of a
# prefill is its FA2 module's name with this suffix.
FA3_SUFFIX, FA3_ARCH = "_sm90", "9.0a"
PER_ARCH_MODULE = "fp4_quantization_"        # named per compute capability: not carried to another
# An FP8 query exists only on FA3 paths: 0.6.13's FA2 generator refuses one ("fp8 tensor core is not
# supported in fa2 backend"), and vLLM 0.25.1 (get_q_data_type) keeps the model's dtype for the query
# where only FA2 exists ("e.g. SM89, SM120"); the model's dtype is the module's output dtype.
FP8_QUERY = re.compile(r"_dtype_q_(e4m3|e5m2)_(.*_dtype_o_([a-z0-9]+)_)")


def derive_for_target(trace: Mapping, recipe: Mapping, target_name: str, how: str) -> dict:
    """What the same runs ask for on ``target_name`` (a GPU the trace was not taken on), from ``trace``
    and the pinned versions' rules: where the target has no 9.0a, every FA3 module becomes the FA2
    module of the same parameters, with the output's dtype for an FP8 query (``FP8_QUERY``); per-arch
    modules are left out. No ``prebuilt``: nothing was loaded."""
    archs = target_archs(recipe, target_name)
    fa3 = any(str(a) == FA3_ARCH for a in archs)
    modules: dict[str, dict] = {}
    for name, entry in trace.get("modules", {}).items():
        if name.startswith(PER_ARCH_MODULE):
            continue
        if not fa3 and name.endswith(FA3_SUFFIX):
            name = FP8_QUERY.sub(lambda m: f"_dtype_q_{m[3]}_{m[2]}", name[:-len(FA3_SUFFIX)])
        have = modules.setdefault(name, {"files": []})
        have["files"] = sorted(set(have["files"]) | set(entry.get("files", [])))
        if entry.get("asked_by") and not entry.get("prebuilt", False):
            have["asked_by"] = sorted(set(have.get("asked_by", [])) | set(entry["asked_by"]))
    return {"package": trace["package"], "version": trace["version"], "target": target_name, "archs": [str(a) for a in archs],
            "how": how, "files": list(trace.get("files", [])), "not_traced": list(trace.get("not_traced", [])),
            "modules": dict(sorted(modules.items()))}


def write_trace(path: Path, trace: Mapping) -> None:
    """The committed form: sorted keys, one module per block, written whole or not at all."""
    atomic_write_text(Path(path), json.dumps(trace, indent=1, sort_keys=True) + "\n")

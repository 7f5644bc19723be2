"""FlashInfer ahead of time: a recipe's kernel set -> flashinfer's own JIT specs -> compiled .so -> wheel.

FlashInfer compiles every kernel with nvcc at first use (JIT). This builder does that work at build
time, for a named kernel set and a target's arch list, and ships the results where the version's
loader looks before it would compile: ``flashinfer/data/aot/<module>/<module>.so`` inside the
flashinfer-python wheel (0.6.13 and 0.7.2.post1 both check that folder first; see the recipe).

Steps (each usable on its own; ``build`` runs them all):

1. ``expand_kernel_set``  -- recipe data -> ``ModuleRequest`` list, validated before any work;
2. ``generate_specs``     -- a subprocess of the build Python imports the sdist's ``flashinfer.jit``
                             (its ``__init__`` skipped), calls each generator with
                             ``FLASHINFER_CUDA_ARCH_LIST`` set and writes each module's build.ninja;
3. ``compile_modules``    -- one ninja run over the modules that need it (resume: a module is skipped
                             when its .so exists and its key -- sources, flags, source tree -- matches);
4. ``build_base_wheel`` + ``graft_modules`` -- the pure wheel, then the .so files added, retagged.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Mapping, Sequence

from ..toolchain import jobs as jobs_mod
from ..toolchain.jobserver import ninja_jobs_args
from ..core.errors import BuildFailed, RecipeError, ToolchainError, UsageError
from ..core.fsutil import _temp_beside, atomic_write_json, record_hash, sha256_file, tree_sha256
from ..toolchain.interrupt import SignalsRaise
from ..toolchain.progress import MemorySampler, RunResult, end_build, first_error
from ..core.recipe import serves
from ..core.targets import CudaArch, Target, parse_arch_list, spell
from ..toolchain.ninja import read_ninja_log
from ..toolchain.toolchain import libcuda_stub
from .base import Built

AOT_DIR_IN_WHEEL = "flashinfer/data/aot"      # where both versions' loaders look first
AOT_LIST_NAME = "blackwheel-aot.json"          # our list of modules + arches, inside that folder
KEY_FILE = ".blackwheel-key"                   # next to each built .so: the inputs it was built from
DEFAULT_UNIT_GIB = 2.0

Progress = Callable[[str], None]


# ---- 1. kernel sets (pure data, no compiling) -------------------------------------------------
@dataclass(frozen=True)
class ModuleRequest:
    """One call of a flashinfer generator: ``fn(**kwargs)`` (or an upstream list when ``expands``)."""

    gen: str
    fn: str
    kwargs: tuple[tuple[str, object], ...] = ()
    expands: bool = False

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.gen}({args})"

    def to_json(self) -> dict:
        return {"fn": self.fn, "kwargs": dict(self.kwargs), "expands": self.expands, "label": self.label}


def kernel_set_names(recipe: Mapping) -> list[str]:
    return sorted(recipe.get("kernel-sets", {}))


def _expand_params(params: Mapping) -> list[dict]:
    """Product over list values; a key ``"a,b"`` takes tuples that bind a and b together."""
    axes: list[list[dict]] = []
    for key, value in params.items():
        names = [k.strip() for k in key.split(",")]
        values = value if isinstance(value, list) else [value]
        if len(names) > 1:
            if any(not isinstance(v, list) or len(v) != len(names) for v in values):
                raise RecipeError(f"kernel-set parameter {key!r} needs a list of {len(names)}-item lists")
            axes.append([dict(zip(names, v)) for v in values])
        else:
            axes.append([{names[0]: v} for v in values])
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def _entry_holds(entry: Mapping, archs: Sequence[CudaArch] | None, where: str) -> bool:
    """A module entry's ``when = { archs = [...] }``: one of the target's archs is served by a listed one
    (FA3 modules compile only for 9.0a). Without a target (``archs`` None) every entry counts."""
    when = dict(entry.get("when", {}))
    listed = when.pop("archs", None)
    if when or (listed is not None and not isinstance(listed, list)):
        raise RecipeError(f"{where}: a module's when takes only archs = [...], got {entry.get('when')!r}")
    if listed is None or archs is None:
        return True
    return any(serves(CudaArch.parse(a), t) for a in listed for t in archs)


def _set_requests(recipe: Mapping, name: str, seen: tuple[str, ...] = (),
                  archs: Sequence[CudaArch] | None = None) -> list[ModuleRequest]:
    sets, gens = recipe.get("kernel-sets", {}), recipe.get("aot", {}).get("generators", {})
    if name not in sets:
        raise UsageError(f"unknown kernel set {name!r}; choose one of: {', '.join(kernel_set_names(recipe))}")
    if name in seen:
        raise RecipeError(f"kernel set {name!r} includes itself ({' -> '.join(seen + (name,))})")
    out: list[ModuleRequest] = []
    for inc in sets[name].get("include", []):
        out += _set_requests(recipe, inc, seen + (name,), archs)
    for entry in sets[name].get("modules", []):
        gen = gens.get(entry.get("gen"))
        if gen is None:
            raise RecipeError(f"kernel set {name!r}: unknown generator {entry.get('gen')!r}")
        if not _entry_holds(entry, archs, f"kernel set {name!r} {entry.get('gen')}"):
            continue
        for params in _expand_params(entry.get("params", {})):
            kwargs = {**gen.get("fixed", {}), **params}
            out.append(ModuleRequest(entry["gen"], gen["fn"], tuple(sorted(kwargs.items())),
                                     bool(gen.get("expands", False))))
    return out


def _check_choices(what: str, asked: Iterable, valid: Sequence) -> None:
    bad = [a for a in asked if a not in valid]
    if bad:
        raise UsageError(f"{what} {', '.join(map(str, bad))} cannot be built by this FlashInfer recipe; "
                         f"choose from: {', '.join(map(str, valid))}")


def expand_kernel_set(recipe: Mapping, name: str, head_dims: Sequence[int] | None = None,
                      dtypes: Sequence[str] | None = None,
                      archs: Sequence[CudaArch] | None = None) -> list[ModuleRequest]:
    """The set's module requests, de-duplicated, optionally narrowed to head dims / q dtypes; with
    ``archs`` (the target's), only the entries whose ``when`` holds for them."""
    aot = recipe.get("aot", {})
    if head_dims:
        _check_choices("head dim", head_dims, aot.get("head-dims", []))
    if dtypes:
        _check_choices("dtype", dtypes, aot.get("dtypes", []))
    out: list[ModuleRequest] = []
    for req in _set_requests(recipe, name, archs=archs):
        kw = dict(req.kwargs)
        if head_dims and "head_dim_qk" in kw and kw["head_dim_qk"] not in head_dims:
            continue
        if dtypes and "dtype_q" in kw and kw["dtype_q"] not in dtypes:
            continue
        _check_choices("head dim", [v for k, v in kw.items() if k.startswith("head_dim")],
                       aot.get("head-dims", []))
        _check_choices("KV dtype", [v for k, v in kw.items() if k.startswith("dtype_") and k != "dtype_idx"],
                       aot.get("kv-dtypes", []))
        if req not in out:
            out.append(req)
    if not out:
        raise UsageError(f"kernel set {name!r} narrowed to head dims {head_dims} / dtypes {dtypes} is empty")
    return out


def module_name(recipe: Mapping, req: ModuleRequest) -> str | None:
    """The name flashinfer gives the module a request makes, from the generator's ``name`` template
    (the version's ``get_*_uri``); None for a generator that expands to upstream's own list."""
    gen = recipe.get("aot", {}).get("generators", {}).get(req.gen, {})
    template = gen.get("name")
    if template is None or req.expands:
        return None
    spell_dtype = recipe.get("aot", {}).get("dtype-names", {})
    kwargs = {k: (spell_dtype.get(v, v) if k.startswith("dtype") else v) for k, v in req.kwargs}
    try:
        return template.format(**kwargs)
    except KeyError as exc:
        raise RecipeError(f"generator {req.gen!r}: its name template uses {exc} which the request lacks") from None


def module_names(recipe: Mapping, name: str, archs: Sequence[CudaArch] | None = None) -> list[str]:
    """The module names a kernel set holds for these archs, without building anything."""
    names = [module_name(recipe, r) for r in expand_kernel_set(recipe, name, archs=archs)]
    if None in names:
        raise UsageError(f"kernel set {name!r} expands to upstream's own list: its names are known only "
                         "after flashinfer's generators run")
    return names


def check_module_names(recipe: Mapping, requests: Sequence[ModuleRequest], made: Sequence[dict]) -> None:
    """Refuse a recipe whose name templates disagree with the modules flashinfer's generators made:
    traces and coverage compare by these names, so a wrong template would make them lie."""
    made_by = {m.get("request"): m["name"] for m in made}
    for req in requests:
        predicted = module_name(recipe, req)
        actual = made_by.get(req.label)
        if predicted is not None and actual is not None and predicted != actual:
            raise RecipeError(f"generator {req.gen!r}: the recipe's name template gives {predicted!r}, "
                              f"flashinfer made {actual!r}; correct [aot.generators] {req.gen}.name")


def kernel_set_table(recipe: Mapping, set_name: str, target: Target | str) -> str:
    """What a set holds for a target, per generator (head dims, the q/KV dtype pairs it holds, backend),
    and the coverage it declares for upstream's tests: ``blackwheel plan flashinfer --kernels SET``."""
    archs = target_archs(recipe, target)
    requests = expand_kernel_set(recipe, set_name, archs=archs)
    short = recipe.get("aot", {}).get("dtype-names", {})
    rows: dict[str, dict[str, set]] = {}
    for req in requests:
        kw = dict(req.kwargs)
        row = rows.setdefault(req.gen, {"modules": set(), "head dims": set(), "q/KV dtypes": set(), "backend": set()})
        row["modules"].add(module_name(recipe, req) or req.label)
        if "head_dim_qk" in kw:
            row["head dims"].add(str(kw["head_dim_qk"]))
        if "backend" in kw:
            row["backend"].add(str(kw["backend"]))
        # pairs, not two lists: FA3 holds e4m3/e4m3 but not f16/e4m3, which two lists would suggest
        if "dtype_q" in kw:
            row["q/KV dtypes"].add("/".join(short.get(str(kw[k]), str(kw[k])) for k in ("dtype_q", "dtype_kv")))
    cols = ["generator", "modules", "head dims", "q/KV dtypes", "backend"]
    table = [cols] + [[gen, str(len(r["modules"]))] + [",".join(sorted(r[c], key=lambda v: (len(v), v))) or "-"
                                                        for c in cols[2:]] for gen, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    name = target if isinstance(target, str) else target.name
    lines = [f"kernel set {set_name!r} for {name} ({';'.join(a.dotted for a in archs)}): "
             f"{sum(len(r['modules']) for r in rows.values())} modules"]
    lines += [("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip() for row in table]
    sets = recipe.get("kernel-sets", {})
    coverage = [(g, t) for n in [*sets[set_name].get("include", []), set_name]
                for g, t in sets[n].get("coverage", {}).items()]
    lines.append("coverage of upstream's tests (outside it: deselected)" if coverage
                 else "coverage: none declared (upstream's tests run whole)")
    for glob, rules in coverage:
        lines.append(f"  {glob}: " + " ".join(f"{k}={v}" for k, v in rules.items()))
    return "\n".join(lines)


def wheel_module_names(paths: Iterable[str]) -> set[str]:
    """The AOT modules among a wheel's object paths: ``flashinfer/data/aot/<m>/<m>.so``."""
    found = set()
    for path in paths:
        parts = PurePosixPath(str(path).replace("\\", "/")).parts
        if len(parts) >= 2 and parts[-1] == f"{parts[-2]}.so" and "aot" in parts[:-2]:  # AOT_DIR_IN_WHEEL
            found.add(parts[-2])
    return found


def target_archs(recipe: Mapping, target: Target | str) -> tuple[CudaArch, ...]:
    """The recipe's arch list for a target, checked against what this FlashInfer can compile."""
    name = target if isinstance(target, str) else target.name
    table = recipe.get("arch", {}).get("targets", {})
    if name not in table:
        raise UsageError(f"FlashInfer recipe has no arch list for target {name!r}; "
                         f"choose one of: {', '.join(table)}")
    return check_archs(recipe, parse_arch_list(table[name]))


def check_archs(recipe: Mapping, archs: Sequence[CudaArch]) -> tuple[CudaArch, ...]:
    supported = parse_arch_list(recipe.get("arch", {}).get("supported", []))
    if not archs:
        raise UsageError("empty arch list for FlashInfer")
    _check_choices("CUDA arch", [a.dotted for a in archs], [a.dotted for a in supported])
    return tuple(archs)


# ---- 2. specs: flashinfer's own generators, in the build Python ---------------------------------
# Run with `python -c`: the build Python needs torch and the sdist, not blackwheel.
_WORKER = r'''
import importlib, inspect, json, pathlib, sys, types
req = json.load(open(sys.argv[1]))
root, build = pathlib.Path(req["root"]), pathlib.Path(req["build_dir"])
# Skip flashinfer/__init__.py: it imports every wrapper and optional runtime deps (cudnn, cutlass-dsl).
pkg = types.ModuleType("flashinfer"); pkg.__path__ = [str(root / "flashinfer")]; sys.modules["flashinfer"] = pkg
import torch
from flashinfer.jit import env as jit_env
# Point the generators at the unpacked sdist (not flashinfer/data, which only a wheel build creates).
jit_env.FLASHINFER_CSRC_DIR, jit_env.FLASHINFER_INCLUDE_DIR = root / "csrc", root / "include"
tp = root / "3rdparty"
jit_env.CUTLASS_INCLUDE_DIRS = [tp / "cutlass/include", tp / "cutlass/tools/util/include"]
jit_env.SPDLOG_INCLUDE_DIR = tp / "spdlog/include"
jit_env.CCCL_INCLUDE_DIRS = [tp / "cccl/cub", tp / "cccl/libcudacxx/include", tp / "cccl/thrust"]
jit_env.FLASHINFER_WORKSPACE_DIR = build
jit_env.FLASHINFER_JIT_DIR, jit_env.FLASHINFER_GEN_SRC_DIR = build / "cached_ops", build / "generated"
for d in (jit_env.FLASHINFER_JIT_DIR, jit_env.FLASHINFER_GEN_SRC_DIR):
    d.mkdir(parents=True, exist_ok=True)

def value(k, v):
    return getattr(torch, v) if k.startswith("dtype") else v

def upstream_all(aot, fn):
    cfg, caps = aot.get_default_config(), aot.detect_sm_capabilities()
    return fn(*[caps if p == "sm_capabilities" else cfg[p.rstrip("_")] for p in inspect.signature(fn).parameters])

out, seen = [], set()
for entry in req["modules"]:
    mod_name, fn_name = entry["fn"].split(":")
    mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name)
    specs = upstream_all(mod, fn) if entry["expands"] else [fn(**{k: value(k, v) for k, v in entry["kwargs"].items()})]
    for spec in specs:
        if spec.name in seen:
            continue
        seen.add(spec.name)
        if not hasattr(spec, "write_ninja"):
            out.append({"name": spec.name, "skipped": type(spec).__name__, "request": entry["label"]})
            continue
        spec.write_ninja()
        out.append({"name": spec.name, "sources": [str(s) for s in spec.sources], "ninja": str(spec.ninja_path),
                    "so": str(spec.jit_library_path), "request": entry["label"]})
json.dump(out, open(req["out"], "w"))
'''


@dataclass(frozen=True)
class AotModule:
    """A module flashinfer's generator described: its build.ninja and the .so it produces."""

    name: str
    request: str
    ninja: Path
    so: Path
    sources: tuple[Path, ...]
    roots: tuple[Path, Path] = (Path("/nonexistent"), Path("/nonexistent"))  # (source tree, build dir)

    def key(self, source_key: str) -> str:
        """What the .so depends on: the source tree, the ninja file (flags, arches), each source.

        Paths of the source tree and the build folder are written as placeholders, so a rebuilt
        tree at another path (a new build key) still reuses modules whose inputs did not change.
        """
        h = hashlib.sha256(source_key.encode())
        h.update(self._placeholders(self.ninja.read_text()).encode())
        for src in self.sources:
            h.update(self._placeholders(src.as_posix()).encode() + b"\0" + src.read_bytes())
        return h.hexdigest()

    def _placeholders(self, text: str) -> str:
        tree, build = self.roots
        return text.replace(str(build), "<build>").replace(str(tree), "<src>")


def build_env(recipe: Mapping, archs: Sequence[CudaArch], base: Mapping | None = None,
              python: str = sys.executable) -> dict:
    """The build environment: the recipe's [env], the arch knob, CUDA_HOME, cuBLAS headers if needed."""
    env = dict(os.environ if base is None else base)
    env.update({k: str(v) for k, v in recipe.get("env", {}).items()})
    arch = recipe.get("arch", {})
    env[arch.get("knob", "FLASHINFER_CUDA_ARCH_LIST")] = spell(archs, arch.get("style", "dotted"),
                                                               arch.get("separator", " "))
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    extra = _cublas_include(env["CUDA_HOME"], python)
    if extra:  # norm / page include trtllm cudaUtils.h, which needs cublasLt.h
        for knob in ("FLASHINFER_EXTRA_CUDAFLAGS", "FLASHINFER_EXTRA_CFLAGS"):
            env[knob] = f"{env.get(knob, '')} -isystem {extra}".strip()
        # ...and so do tools the generators compile with a bare `nvcc` (fmha_v2's print_traits)
        env["CPATH"] = os.pathsep.join(p for p in (env.get("CPATH"), extra) if p)
    return env


def _cublas_include(cuda_home: str, python: str) -> str | None:
    """cuBLAS headers from the nvidia-cublas wheel when the toolkit has none (a slim CUDA image)."""
    if (Path(cuda_home) / "include" / "cublasLt.h").exists():
        return None
    prefix = Path(python).absolute().parent.parent  # a venv: keep its bin/ (no resolve: that leaves it)
    for hit in sorted(prefix.glob("lib/python3*/site-packages/nvidia/cu*/include/cublasLt.h")):
        return str(hit.parent)
    return None


def with_libcuda_stub(env: Mapping, build_dir: Path) -> dict:
    """Let modules link ``-lcuda`` on a build host without a driver or the toolkit's stubs."""
    env = dict(env)
    stub = libcuda_stub(Path(env.get("CUDA_HOME", "/usr/local/cuda")), build_dir / "stubs", env.get("CXX", "c++"))
    if stub is not None:
        env["FLASHINFER_EXTRA_LDFLAGS"] = f"{env.get('FLASHINFER_EXTRA_LDFLAGS', '')} -L{stub.parent}".strip()
    return env


def generate_specs(src_dir: Path, requests: Sequence[ModuleRequest], env: Mapping, build_dir: Path,
                   python: str = sys.executable) -> tuple[list[AotModule], list[dict]]:
    """Run flashinfer's generators; returns (modules to compile, entries upstream builds otherwise)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    req_file, out_file = build_dir / "spec-request.json", build_dir / "spec-list.json"
    atomic_write_json(req_file, {"root": str(Path(src_dir).resolve()), "build_dir": str(build_dir.resolve()),
                                 "out": str(out_file.resolve()), "modules": [r.to_json() for r in requests]})
    out_file.unlink(missing_ok=True)
    proc = subprocess.run([python, "-c", _WORKER, str(req_file)], env=dict(env), cwd=build_dir,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.exists():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildFailed(f"FlashInfer spec generation failed ({python}): {last}")
    entries = json.loads(out_file.read_text())
    roots = (Path(src_dir).resolve(), build_dir.resolve())
    modules = [AotModule(e["name"], e["request"], Path(e["ninja"]), Path(e["so"]),
                         tuple(Path(s) for s in e["sources"]), roots) for e in entries if "skipped" not in e]
    return modules, [e for e in entries if "skipped" in e]


# ---- 3. compile (resumable) --------------------------------------------------------------------
def plan_jobs(unit_gib: float = DEFAULT_UNIT_GIB, cores: int | None = None,
              avail_bytes: int | None = None) -> tuple[int, str]:
    """(parallel nvcc jobs, why): toolchain.jobs' rule for this machine's cores and free memory.

    nvcc threads stay at 1 (the recipe's FLASHINFER_NVCC_THREADS): they are written into each
    module's build.ninja, so a different count would change every module's key and defeat resume.
    """
    if cores is None or avail_bytes is None:
        found_cores, found_bytes = jobs_mod.machine_resources()
        cores = found_cores if cores is None else cores
        avail_bytes = found_bytes if avail_bytes is None else avail_bytes
    plan = jobs_mod.plan_jobs(cores, avail_bytes, int(unit_gib * jobs_mod.GIB), nvcc_threads=1)
    return plan.jobs, plan.reason


def stale_modules(modules: Sequence[AotModule], source_key: str) -> list[AotModule]:
    """Modules whose .so is missing or was built from other inputs (those .so are removed)."""
    todo = []
    for m in modules:
        stamp = m.so.parent / KEY_FILE
        if m.so.exists() and stamp.exists() and stamp.read_text().strip() == m.key(source_key):
            continue
        m.so.unlink(missing_ok=True)
        todo.append(m)
    return todo


def _ninja() -> str:
    here = Path(sys.executable).parent / "ninja"
    found = str(here) if here.exists() else shutil.which("ninja")
    if not found:
        raise ToolchainError("ninja not found: install it (pip install ninja) into the build environment")
    return found


@dataclass
class CompileReport:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # per module: sum of its units (ninja log)
    wall_s: float = 0.0
    jobs: int = 1


def compile_modules(modules: Sequence[AotModule], build_dir: Path, env: Mapping, source_key: str,
                    jobs: int, log_path: Path, progress: Progress = print) -> CompileReport:
    """Compile what is stale, in one ninja run with ``jobs`` parallel units; stamp each result."""
    todo = stale_modules(modules, source_key)
    report = CompileReport(reused=[m.name for m in modules if m not in todo], jobs=jobs)
    progress(f"flashinfer AOT: {len(modules)} modules, {len(report.reused)} up to date, "
             f"{len(todo)} to compile with {jobs} jobs")
    if todo:
        top = build_dir / "blackwheel-aot.ninja"
        top.write_text("ninja_required_version = 1.3\n" + "".join(f"subninja {m.ninja}\n" for m in todo))
        cmd = [_ninja(), "-f", str(top), *ninja_jobs_args(jobs, env)]
        progress("$ " + " ".join(cmd))
        start = time.monotonic()
        rc = _run_with_progress(cmd, build_dir, env, todo, log_path, progress, start)
        report.wall_s = time.monotonic() - start
        for m in todo:  # stamp what exists: a failed run resumes from here
            if m.so.exists():
                (m.so.parent / KEY_FILE).write_text(m.key(source_key) + "\n")
                report.built.append(m.name)
        if rc != 0:
            raise BuildFailed(f"FlashInfer AOT compile failed: {first_error(log_path) or 'see log'} (log: {log_path})")
    report.seconds = module_seconds(build_dir / ".ninja_log", modules)
    return report


def _run_with_progress(cmd: list[str], cwd: Path, env: Mapping, todo: Sequence[AotModule],
                       log_path: Path, progress: Progress, start: float) -> int:
    pending = {m.name: m.so for m in todo}
    lock = threading.Lock()

    def announce() -> None:
        with lock:
            for name, so in list(pending.items()):
                if so.exists():
                    del pending[name]
                    done = len(todo) - len(pending)
                    progress(f"  module [{done}/{len(todo)}] {name} ({time.monotonic() - start:.0f} s)")

    log_path.parent.mkdir(parents=True, exist_ok=True)
    # this run only: first_error reads it. Interrupts end ninja's jobs and the sccache server's (end_build)
    with open(log_path, "w") as log, SignalsRaise(only_first=True) as signals:
        with signals.held():
            proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                unit = _UNIT_RE.match(line)
                if unit:  # ninja links late (critical path first): show units too, not only modules
                    progress(f"  unit {unit.group(1)}/{unit.group(2)} ({time.monotonic() - start:.0f} s)")
                announce()
            rc = proc.wait()
        except BaseException:
            with signals.held():
                end_build(proc, env)
            raise
    announce()
    return rc


_UNIT_RE = re.compile(r"^\[(\d+)/(\d+)\]")


def module_seconds(ninja_log: Path, modules: Sequence[AotModule]) -> dict[str, float]:
    """Sum of each module's build steps, from ninja's own log (start/end in ms)."""
    ends = read_ninja_log(ninja_log)
    out = {}
    for m in modules:
        prefix = str(m.so.parent.resolve()) + os.sep
        out[m.name] = round(sum(s for path, s in ends.items() if path.startswith(prefix)), 1)
    return out


# ---- 4. the wheel: upstream's pure wheel + our .so files -----------------------------------------
def build_base_wheel(src_dir: Path, env: Mapping, out_dir: Path, python: str = sys.executable,
                     log_path: Path | None = None) -> Path:
    """flashinfer-python's own wheel (pure Python + kernel sources), built offline."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "-w", str(out_dir), str(src_dir)]
    proc = subprocess.run(cmd, env=dict(env), capture_output=True, text=True)
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    wheels = sorted(out_dir.glob("flashinfer_python-*-py3-none-any.whl"), key=os.path.getmtime)
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BuildFailed(f"flashinfer-python wheel build failed: {last}")
    return wheels[-1]


def _retag(name: str, data: bytes, old_info: str, new_info: str, version: str, tag: str) -> tuple[str, bytes]:
    """Move a dist-info member to the new version's folder; fix METADATA's Version and WHEEL's tag."""
    name = new_info + name[len(old_info):] if name.startswith(old_info + "/") else name
    if name == f"{new_info}/METADATA":
        data = re.sub(rb"(?m)^Version: .*$", f"Version: {version}".encode(), data, count=1)
    elif name == f"{new_info}/WHEEL":
        text = re.sub(r"(?m)^(Tag|Root-Is-Purelib): .*\n", "", data.decode())
        data = (text.rstrip("\n") + f"\nRoot-Is-Purelib: false\nTag: {tag}\n").encode()
    return name, data


def graft_modules(base_wheel: Path, modules: Sequence[AotModule], archs: Sequence[CudaArch],
                  out_dir: Path, local_version: str | None = None, plat: str | None = None) -> Path:
    """A new wheel: the base wheel's files, the .so files under flashinfer/data/aot, our module list."""
    dist, version = base_wheel.name.split("-")[:2]
    new_version = f"{version}+{local_version}" if local_version else version
    plat = plat or f"linux_{platform.machine()}"
    tag = f"py3-none-{plat}"
    old_info, new_info = f"{dist}-{version}.dist-info", f"{dist}-{new_version}.dist-info"
    listing = {"archs": [a.dotted for a in archs], "modules": sorted(m.name for m in modules)}
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{dist}-{new_version}-{tag}.whl"
    fd, tmp = _temp_beside(target)
    os.close(fd)
    try:
        _write_grafted(base_wheel, Path(tmp), modules, listing, (old_info, new_info, new_version, tag))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a wheel is for everyone to read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _write_grafted(base_wheel: Path, tmp: Path, modules: Sequence[AotModule], listing: dict,
                   names: tuple[str, str, str, str]) -> None:
    old_info, new_info, version, tag = names
    rows: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(base_wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith(".dist-info/RECORD"):
                continue
            name, data = _retag(info.filename, src.read(info), old_info, new_info, version, tag)
            dst.writestr(name, data)
            rows.append((name, record_hash(data), str(len(data))))
        for m in modules:
            name = f"{AOT_DIR_IN_WHEEL}/{m.name}/{m.name}.so"
            data = m.so.read_bytes()
            zinfo = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zinfo.external_attr = 0o755 << 16
            dst.writestr(zinfo, data, compress_type=zipfile.ZIP_DEFLATED)
            rows.append((name, record_hash(data), str(len(data))))
        data = (json.dumps(listing, indent=2, sort_keys=True) + "\n").encode()
        dst.writestr(f"{AOT_DIR_IN_WHEEL}/{AOT_LIST_NAME}", data)
        rows.append((f"{AOT_DIR_IN_WHEEL}/{AOT_LIST_NAME}", record_hash(data), str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows + [(f"{new_info}/RECORD", "", "")])
        dst.writestr(f"{new_info}/RECORD", buf.getvalue())


# ---- one AOT build: what it is asked and what it made -----------------------------------------------
@dataclass(frozen=True)
class AotRequest:
    """Everything one FlashInfer AOT build needs; ``build`` validates it before compiling."""

    src_dir: Path                      # extracted, patched sdist
    recipe: Mapping                    # recipes/flashinfer.toml, parsed
    target: Target | str               # arch list from the recipe's [arch].targets
    kernel_set: str = "default"
    work_dir: Path = Path("build/flashinfer")   # keep it between runs: that is the resume cache
    out_dir: Path = Path("dist")
    python: str = sys.executable       # a Python with torch, ninja, apache-tvm-ffi, setuptools
    head_dims: tuple[int, ...] = ()
    dtypes: tuple[str, ...] = ()
    jobs: int | None = None            # default: plan_jobs(recipe [aot].unit-memory-gib)
    local_version: str | None = None   # e.g. "cu130.sm121" -> flashinfer_python-0.6.13+cu130.sm121
    source_key: str | None = None      # e.g. the patched tree's sha256; default: hash of csrc/ + include/
    base_env: Mapping | None = None    # the pipeline's environment (toolchain, PATH); default os.environ


@dataclass
class AotResult:
    wheel: Path
    archs: list[str]
    modules: list[str]                 # what the wheel carries, for the manifest
    skipped: list[dict]                # upstream entries this builder cannot compile ahead of time
    report: CompileReport

    def manifest(self) -> dict:
        return {"aot": {"archs": self.archs, "modules": self.modules, "skipped": self.skipped,
                        "jobs": self.report.jobs, "compile_s": self.report.seconds,
                        "wall_s": round(self.report.wall_s, 1), "wheel_sha256": sha256_file(self.wheel)}}


def build(req: AotRequest, progress: Progress = print) -> AotResult:
    """Validate, generate specs, compile what is stale, package. Bad input fails before nvcc runs."""
    archs = target_archs(req.recipe, req.target)
    requests = expand_kernel_set(req.recipe, req.kernel_set, req.head_dims or None, req.dtypes or None, archs)
    env = build_env(req.recipe, archs, base=req.base_env, python=req.python)
    tag = "_".join(a.compact for a in archs)
    build_dir = Path(req.work_dir) / f"aot-{tag}"
    env = with_libcuda_stub(env, build_dir)
    progress(f"flashinfer AOT: set {req.kernel_set!r} ({len(requests)} requests) for "
             f"{env['FLASHINFER_CUDA_ARCH_LIST']!r}")
    modules, skipped = generate_specs(Path(req.src_dir), requests, env, build_dir, req.python)
    check_module_names(req.recipe, requests, [{"name": m.name, "request": m.request} for m in modules])
    source_key = req.source_key or _source_key(Path(req.src_dir))
    jobs, why = (req.jobs, "asked") if req.jobs else plan_jobs(
        float(req.recipe.get("expect", {}).get("unit-memory-gib", DEFAULT_UNIT_GIB)))
    progress(f"flashinfer AOT: {jobs} jobs ({why})")
    report = compile_modules(modules, build_dir, env, source_key, jobs, build_dir / "aot.log", progress)
    base = build_base_wheel(Path(req.src_dir), env, build_dir / "base-wheel", req.python,
                            build_dir / "base-wheel.log")
    wheel = graft_modules(base, modules, archs, Path(req.out_dir), req.local_version)
    progress(f"flashinfer AOT: {wheel.name} ({wheel.stat().st_size / 2**20:.0f} MiB, {len(modules)} modules)")
    return AotResult(wheel, [a.dotted for a in archs], sorted(m.name for m in modules), skipped, report)


def _source_key(src_dir: Path) -> str:
    return hashlib.sha256("".join(tree_sha256(src_dir / d) for d in ("csrc", "include")).encode()).hexdigest()


# ---- the builder: what the pipeline calls ------------------------------------------------------------
class FlashInferAot:
    """``recipe.builder == "flashinfer-aot"``: the kernel set of ``req.kernel_set`` (default
    ``default``), compiled ahead of time into the flashinfer-python wheel. Its module cache stays in
    ``req.workdir/flashinfer-aot/<version>``, so a rerun compiles only what changed."""

    name = "flashinfer-aot"

    def key(self, req) -> dict:
        return {"kernel_set": req.kernel_set or "default"}

    def environment(self, req, toolchain, base: dict, env: dict) -> dict:
        return env

    def plan(self, req, out: Path, prepare) -> str:
        """A set of modules, not one build file: what the set holds for the target (nothing fetched)."""
        return kernel_set_table(req.recipe.data, req.kernel_set or "default", req.target)

    def build(self, req, tree: Path, env: dict, out: Path, log: Path) -> Built:
        sampler = MemorySampler()
        sampler.start()
        start = time.monotonic()
        aot_req = AotRequest(src_dir=tree, recipe=req.recipe.data, target=req.target,
                             kernel_set=req.kernel_set or "default",
                             work_dir=Path(req.workdir) / "flashinfer-aot" / req.version.version,
                             out_dir=out, python=req.python, jobs=req.jobs, base_env=env)
        log.parent.mkdir(parents=True, exist_ok=True)
        rc, first, done, total, manifest = 0, None, 0, 0, {}
        with open(log, "a", encoding="utf-8") as f:
            def progress(line: str) -> None:
                print(line, file=sys.stderr, flush=True)
                f.write(line + "\n")
                f.flush()
            try:
                result = build(aot_req, progress)
                manifest, done = result.manifest(), len(result.modules)
                total = done
            except BuildFailed as exc:
                rc, first = 1, str(exc)
        peak = sampler.stop()
        return Built(RunResult(rc, time.monotonic() - start, peak, done, total, log, first), manifest)

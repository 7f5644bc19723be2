"""``doctor``, ``repro-1969``, ``report``, ``test-upstream``, ``bench``, ``bench-build``: what is
measured and told about a machine or a build."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_json
from ..core.recipe import load_recipe, load_stack
from ..pipeline.build import BuildRequest
from ..reports import bench, doctor, gpu_report, repro, upstream_tests
from ..reports.bench_build import bench_build
from ..toolchain.machine import detect_compute_capability
from .common import fetcher_of, pinned, settings, target_of


def _doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine: GPU, CUDA, compiler, torch, installed kernels")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_doctor)


def _repro_parser(sub) -> None:
    p = sub.add_parser("repro-1969", help="reproduce flash-attention issue #1969 and prove the fix")
    p.add_argument("--out", type=Path, default=Path("docs/reports"), help="folder for repro-1969.{md,json}")
    p.add_argument("--units", type=int, default=1,
                   help=f"diagnostic compile units per scenario (0..{len(repro.DIAGNOSTIC_UNITS)})")
    p.add_argument("--stack", help="stack (default: the default stack)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--name", default="repro-1969", help="report file name stem")
    p.set_defaults(func=cmd_repro)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="turn GPU bench / kernel-test results into Markdown, JSON and PNG")
    p.add_argument("results", help="bench.json written by blackwheel bench")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--tests", help="JSON lines written by tests/gpu (BLACKWHEEL_RESULTS)")
    p.set_defaults(func=cmd_report)


def cmd_doctor(args) -> int:
    text, status = doctor.report(doctor.probe_machine(), args.json)
    print(text)
    return status


def cmd_repro(args) -> int:
    md = repro.reproduce(load_stack(args.stack), args.python, args.units, args.out, args.name, fetcher_of(args),
                         detect_compute_capability())
    print(md)
    return 0


def cmd_report(args) -> int:
    for path in gpu_report.write_report(args.results, args.out, args.tests).values():
        print(f"wrote {path}")
    return 0


# ---- test-upstream ------------------------------------------------------------------------------------
def _test_upstream_parser(sub) -> None:
    p = sub.add_parser("test-upstream", help="run a package's own test suite against the installed wheels")
    p.add_argument("package")
    p.add_argument("--stack", help="stack name (default: the default stack)")
    p.add_argument("--kernels", dest="kernel_set", help="FlashInfer: the installed kernel set, whose coverage "
                   "deselects what it does not hold (default: default)")
    p.add_argument("--python", default=sys.executable, help="the Python the wheels are installed in")
    p.add_argument("--out", type=Path, help="write the counts as JSON and Markdown into this folder")
    p.add_argument("--offline", action="store_true", default=None)
    p.add_argument("--mirror", help="mirror folder or source bundle")
    p.add_argument("--only", nargs="+", default=[], metavar="GLOB", help="keep only these of the recipe's test files")
    p.add_argument("--deadline-s", type=float, metavar="S",
                   help="skip (and count as not run) the tests not started S seconds after pytest starts, "
                        "so a run with a time limit still ends with its counts")
    p.add_argument("--rest-of", type=Path, metavar="DIR",
                   help="the --out folder of a run a deadline left partial: run only the tests it did not, "
                        "and report both runs' counts together")
    p.add_argument("--pytest-args", default="", metavar="ARGS",
                   help="passed to pytest, one string (e.g. --pytest-args='-x -k norm')")
    p.set_defaults(func=cmd_test_upstream)


def cmd_test_upstream(args) -> int:
    if args.deadline_s is not None and args.deadline_s <= 0:
        raise UsageError(f"--deadline-s {args.deadline_s:g}: give a number of seconds above 0")
    rest_of = None
    if args.rest_of is not None:
        if args.only:
            raise UsageError("--rest-of runs what that run left; --only cannot narrow it")
        earlier = args.rest_of / f"upstream-tests-{args.package}.json"
        try:
            rest_of = json.loads(earlier.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--rest-of {args.rest_of}: no readable {earlier.name} ({exc})") from None
    stack = load_stack(args.stack)
    recipe = load_recipe(args.package)
    version = pinned(stack, recipe)
    kernel_set = args.kernel_set or ("default" if "kernel-sets" in recipe.data else None)
    work = settings(args).workdir / "upstream-tests" / recipe.name
    result = upstream_tests.run_upstream_tests(recipe, version, fetcher_of(args), work, args.python, kernel_set,
                                               shlex.split(args.pytest_args), args.only, args.deadline_s, rest_of)
    text = upstream_tests.report_text(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / f"upstream-tests-{recipe.name}.json", result)
        (args.out / f"upstream-tests-{recipe.name}.md").write_text(text + "\n")
    totals = {k: sum(c.get(k, 0) for c in result["files"].values()) for k in ("failed", "skipped_missing_module")}
    return 1 if totals["failed"] or totals["skipped_missing_module"] or result["pytest_exit"] not in (0, 5) else 0


# ---- bench, bench-build --------------------------------------------------------------------------------
def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="kernel throughput against this GPU's measured ceilings and torch",
                       description=bench.__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for bench.json")
    p.add_argument("--packages", nargs="+", default=["flash_attn"], help=f"of: {', '.join(bench.BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="fewer samples and serving shapes (~1 minute)")
    p.add_argument("--manifest", action="append", default=[], help="a wheel manifest to record (repeatable)")
    p.add_argument("--wheelhouse", help="record every *.manifest.json found under this folder")
    p.add_argument("--skip-first-launch", action="store_true", help="no fresh-process first-launch check")
    p.add_argument("--first-launch-timeout", type=float, default=240.0, help="seconds per subprocess")
    p.add_argument("--device", default="cuda",
                   help="'cpu' checks the harness on tiny shapes (numbers mean nothing)")
    p.add_argument("--first-launch-child", nargs=2, metavar=("PACKAGE", "FAMILY"), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.first_launch_child:   # the fresh process bench.first_launch starts
        return bench.first_launch_child(*args.first_launch_child, args.device)
    if not args.out:
        raise UsageError("--out DIR is required")
    return bench.run(args)


def _bench_build_parser(sub) -> None:
    p = sub.add_parser("bench-build", help="build speed: ours against upstream's own command, same run",
                       description="Build-speed benchmark: our build against upstream's own command, same "
                                   "machine, same run.")
    p.add_argument("package")
    p.add_argument("--target", default="hopper")
    p.add_argument("--stack")
    p.add_argument("--units", type=int, default=0, help="compile this many units of the profile (0: all)")
    p.add_argument("--cores", type=int, help="pin each run to this many CPUs")
    p.add_argument("--together", action="store_true", help="upstream and ours at once, on disjoint CPUs")
    p.add_argument("--touch", action="store_true", help="then rebuild ours with one unit changed (cache warm)")
    p.add_argument("--ours-only", action="store_true", help="no upstream run (FlashInfer: its AOT list is `all`)")
    p.add_argument("--split-compile", type=int, default=0, metavar="N",
                   help="instead of upstream: ours against ours with nvcc -split-compile=N on the units "
                        "longer than the profile's median")
    p.add_argument("--kernels", help="FlashInfer: the AOT kernel set (recipe [kernel-sets])")
    p.add_argument("--out", type=Path, default=Path("docs/reports"))
    p.set_defaults(func=cmd_bench_build)


def cmd_bench_build(args) -> int:
    req = BuildRequest(load_recipe(args.package), load_stack(args.stack), target_of(args.target),
                       python=sys.executable, kernel_set=args.kernels, wheelhouse=settings(args).wheelhouse,
                       workdir=settings(args).workdir, fetcher=fetcher_of(args))
    print(bench_build(req, args.out, args.units, args.cores, args.together, args.touch, args.ours_only,
                      args.split_compile))
    return 0


PARSERS = {
    "doctor": _doctor_parser,
    "repro-1969": _repro_parser,
    "report": _report_parser,
    "test-upstream": _test_upstream_parser,
    "bench": _bench_parser,
    "bench-build": _bench_build_parser,
}


def register(sub) -> None:
    """Every command of this module, in its order."""
    for add in PARSERS.values():
        add(sub)

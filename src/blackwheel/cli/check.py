"""``inspect``, ``verify``, ``compat``: what CUDA code a file holds, and whether it runs on a target."""

from __future__ import annotations

import json
from pathlib import Path

from ..check.inspect import inspect_path
from ..check.verify import compat_path, verify_paths, with_findings
from ..core.errors import UsageError
from ..core.targets import TARGET_NAMES, ComputeCapability, CudaArch, parse_arch_list
from ..reports.traces import read_trace, trace_verdict
from .common import target_of


def _inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect", help="list the cubins and PTX (per arch) in a wheel, .so, .o, folder or installed package")
    p.add_argument("path", metavar="PATH", help="wheel, ELF file, folder or installed distribution name")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)


def _verify_parser(sub) -> None:
    v = sub.add_parser("verify", help="fail unless every CUDA object runs natively on each target device")
    v.add_argument("paths", nargs="+", metavar="PATH", help="wheel, ELF file, folder or installed package")
    v.add_argument("--target", required=True, metavar="T", help=f"one of: {', '.join(TARGET_NAMES)}")
    v.add_argument("--require", action="append", default=[], metavar="GLOB=ARCHS",
                   help="objects matching GLOB must carry these cubins, e.g. '*_C.abi3.so=12.1a'")
    v.add_argument("--trace", type=Path, metavar="FILE",
                   help="a recorded FlashInfer trace (recipes/traces/*.json): fail unless the wheel holds "
                        "every module it asked for, outside the set's declared coverage excepted")
    v.add_argument("--json", action="store_true", help="print JSON instead of text")
    v.set_defaults(func=cmd_verify)


def _compat_parser(sub) -> None:
    c = sub.add_parser("compat", help="per CUDA object: native, ptx-jit or none on a compute capability")
    c.add_argument("path", metavar="PATH", help="wheel, ELF file, folder or installed package")
    c.add_argument("--cc", required=True, help="compute capability of the device, e.g. 12.1")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.set_defaults(func=cmd_compat)


def cmd_inspect(args) -> int:
    report = inspect_path(args.path)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render_text())
    return 1 if report.errors else 0


def _required_arg(text: str) -> tuple[str, tuple[CudaArch, ...]]:
    glob, sep, archs = text.partition("=")
    if not sep or not glob:
        raise UsageError(f"--require {text!r}: write GLOB=ARCH[,ARCH], e.g. '*_C.abi3.so=12.1a'")
    return glob, parse_arch_list(archs)


def cmd_verify(args) -> int:
    target = target_of(args.target)
    required = dict(_required_arg(r) for r in args.require)
    trace = read_trace(args.trace, target.name) if args.trace else None   # bad input fails before inspect
    report = verify_paths(args.paths, target, required)
    if trace is not None:
        gaps, note = trace_verdict(trace, (o.path for o in report.objects))
        report = with_findings(report, gaps, [note])
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render_text())
    report.raise_for_failure()
    return 0


def cmd_compat(args) -> int:
    """Exit 1 when some object has no code at all for the device."""
    cc = ComputeCapability.parse(args.cc)
    entries = compat_path(args.path, cc)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        print("\n".join(e.render_text() for e in entries) or f"{args.path}: no CUDA code")
    return 1 if any(e.verdict == "none" for e in entries) or not entries else 0


PARSERS = {
    "inspect": _inspect_parser,
    "verify": _verify_parser,
    "compat": _compat_parser,
}


def register(sub) -> None:
    """Every command of this module, in its order."""
    for add in PARSERS.values():
        add(sub)

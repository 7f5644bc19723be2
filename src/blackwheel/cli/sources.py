"""``fetch``, ``bundle``, ``patches``: the sources stage's commands."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..core.errors import SourceError, UsageError
from ..core.recipe import load_stack, stack_names
from ..core.targets import DEFAULT_TARGET
from ..sources.bundle import write_bundle
from ..sources.fetch import stack_sources, stack_test_sources
from ..sources.patch import check_stack_patches
from .common import fetcher_of, target_of


def _fetch_parser(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and verify every source of a stack (or one package)")
    p.add_argument("package", nargs="?", help="one recipe (default: all of the stack)")
    p.add_argument("--stack", help="stack name (default: the default stack)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--offline", action="store_true", default=None, help="read only the cache and mirror")
    p.add_argument("--mirror", help="mirror folder or source bundle file, for air-gapped hosts")
    p.add_argument("--allow-absent", action="store_true", default=None,
                   help="accept git trees whose store lacks some file contents (recorded in the manifest)")
    p.add_argument("--check", action="store_true", help="only list what is missing; fetch nothing")
    p.set_defaults(func=cmd_fetch)


def _bundle_parser(sub) -> None:
    p = sub.add_parser("bundle", help="write every pinned source of a stack and target into one file")
    p.add_argument("packages", nargs="*", help="only these recipes (default: every package of the stack)")
    p.add_argument("--stack", help="stack name (default: the default stack)")
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("-o", "--out", type=Path, required=True, help="the bundle file to write")
    p.add_argument("--offline", action="store_true", default=None, help="read only the cache and mirror")
    p.add_argument("--mirror", help="mirror folder or bundle to read sources from")
    p.add_argument("--allow-absent", action="store_true", default=None,
                   help="accept git trees whose store lacks some file contents (named in the bundle)")
    p.add_argument("--with-tests", action="store_true",
                   help="also upstream's own tests where they are a pinned tree of their own (test-upstream)")
    p.set_defaults(func=cmd_bundle)


def _patches_parser(sub) -> None:
    p = sub.add_parser("patches", help="check that every patch of every stack applies to its pinned source")
    p.add_argument("--stack", action="append", help="only these stacks (default: all)")
    p.set_defaults(func=cmd_patches)


def cmd_fetch(args) -> int:
    stack = load_stack(args.stack)
    target = target_of(args.target)
    fetcher = fetcher_of(args)
    sources = stack_sources(stack, target, [args.package] if args.package else None)
    if args.check:
        missing, notes = fetcher.check(sources)
        for line in missing:
            print(f"missing: {line}")
        for line in notes:
            print(f"note: {line}")
        print(f"{len(sources) - len(missing) - len(notes)} of {len(sources)} sources present "
              f"for {stack.name} / {target.name}")
        return 1 if missing else 0
    for src in sources:
        path, note = fetcher.fetch_optional(src)
        print(f"note: {note}" if note else f"ok  {src.label}  {path}")
    return 0


def cmd_bundle(args) -> int:
    stack = load_stack(args.stack)
    target = target_of(args.target)
    if args.out.is_dir():
        raise UsageError(f"{args.out} is a folder; -o names the bundle file to write")
    fetcher = fetcher_of(args)
    sources = stack_sources(stack, target, args.packages or None)
    if args.with_tests:
        sources += stack_test_sources(stack, args.packages or None)
    missing, _ = fetcher.check(sources) if fetcher.offline else ([], [])
    if missing:   # offline: refuse before any work, naming everything absent
        raise SourceError(f"cannot bundle {stack.name} / {target.name}: missing {'; '.join(missing)}")
    summary = write_bundle(sources, fetcher, args.out,
                           {"stack": stack.name, "target": target.name,
                            "packages": args.packages or sorted(stack.pins)})
    for note in summary["notes"]:
        print(f"note: {note}")
    mib = 2**20
    print(f"wrote {args.out}: {summary['sources']} sources, {summary['bytes'] / mib:.1f} MiB "
          f"(separate archives: {summary['separate_bytes'] / mib:.1f} MiB, ratio {summary['ratio']})")
    return 0


def cmd_patches(args) -> int:
    fetcher = fetcher_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stack or stack_names():
            for line in check_stack_patches(load_stack(name), fetcher, Path(tmp)):
                print(line)
    return 0


PARSERS = {
    "fetch": _fetch_parser,
    "bundle": _bundle_parser,
    "patches": _patches_parser,
}


def register(sub) -> None:
    """Every command of this module, in its order."""
    for add in PARSERS.values():
        add(sub)

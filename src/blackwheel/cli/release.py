"""``publish``, ``provenance``, ``smoke-install``: the release stage's commands."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..core.errors import PublishError, UsageError
from ..release.index import build_static_index
from ..release.manifest import read_manifest
from ..release.provenance import provenance
from ..release.publish import check_url, publish, smoke_install
from ..release.wheelhouse import wheels
from .common import settings


def _publish_parser(sub) -> None:
    p = sub.add_parser("publish", help="write the static index of the wheelhouse, or upload to an index (--to)")
    p.add_argument("--wheelhouse",
                   help="folder of <stack>/<target>/*.whl (default: $BLACKWHEEL_WHEELHOUSE or ./wheelhouse)")
    p.add_argument("--stack", help="only this stack's wheels")
    p.add_argument("--target", help="only this target's wheels")
    p.add_argument("--to", metavar="URL", help="upload URL of an index with the upload API (default: static index)")
    p.add_argument("--simple-url", metavar="URL",
                   help="the index's simple API, to check what is already there (default: derived from --to)")
    p.add_argument("--out", type=Path, help="static index folder (default: WHEELHOUSE/index)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="also publish wheels without a manifest or whose verify failed")
    p.set_defaults(func=cmd_publish)


def _provenance_parser(sub) -> None:
    q = sub.add_parser("provenance", help="where every byte of a wheel came from (from its manifest)")
    q.add_argument("wheel", help="path to a .whl")
    q.add_argument("--wheelhouse", help="where to look for its manifest by sha256 (default as for publish)")
    q.set_defaults(func=cmd_provenance)


def _smoke_install_parser(sub) -> None:
    r = sub.add_parser("smoke-install", help="install packages from an index into a fresh venv and import them")
    r.add_argument("packages", nargs="*", help="requirements (default: every package of the stack's wheelhouse)")
    r.add_argument("--index-url", required=True, help="the index to install from (file:// or http(s)://)")
    r.add_argument("--extra-index-url", action="append", default=[], help="e.g. the PyTorch cu130 wheel index")
    r.add_argument("--venv", type=Path, default=Path("build/smoke-venv"), help="where the fresh venv goes")
    r.add_argument("--wheelhouse", help="folder of <stack>/<target>/*.whl, for the default package list")
    r.add_argument("--stack", help="the default package list from this stack's wheels only")
    r.add_argument("--target", help="the default package list from this target's wheels only")
    r.set_defaults(func=cmd_smoke_install)


def wheelhouse_requirements(root, stack: str | None = None, target: str | None = None) -> list[str]:
    """``dist==version`` for each wheel of the wheelhouse (of one stack, one target); one version a
    package, or pip would be asked for two at once."""
    versions: dict[str, set[str]] = {}
    for m in map(read_manifest, wheels(root, stack, target)):
        versions.setdefault(m["dist_name"], set()).add(m["version"])
    twice = {d: sorted(v) for d, v in versions.items() if len(v) > 1}
    if twice:
        dist, both = next(iter(sorted(twice.items())))
        raise UsageError(f"the wheelhouse holds {len(both)} versions of {dist} ({', '.join(both)}): give "
                         "--stack and --target, or name the packages")
    return sorted(f"{d}=={v.pop()}" for d, v in versions.items())


def cmd_publish(args) -> int:
    if args.to:  # bad URLs are refused before any work
        check_url(args.to, "--to URL")
        if args.simple_url:
            check_url(args.simple_url, "--simple-url")
    report = build_static_index(settings(args).wheelhouse, args.out, stack=args.stack, target=args.target,
                                allow_unverified=args.allow_unverified)
    for w in report.wheels:
        print(f"  {w.filename}  {w.size / 1e6:.1f} MB  sha256 {w.sha256}")
    state = "updated" if report.changed else "unchanged"
    print(f"static index {state}: {report.out} ({len(report.wheels)} wheels, manifests and SBOMs in files/)")
    if not args.to:
        print(f"install with: pip install --index-url {report.simple_url} <package>")
        return 0
    # the static index above carries the provenance servers refuse
    uploaded = publish([w.path for w in report.wheels], args.to, simple_url=args.simple_url,
                       allow_unverified=args.allow_unverified)
    print(uploaded.summary())
    return 0


def cmd_smoke_install(args) -> int:
    packages = args.packages or wheelhouse_requirements(settings(args).wheelhouse, args.stack, args.target)
    if not packages:
        raise PublishError("nothing to install: name packages, or build some into the wheelhouse first")
    shutil.rmtree(args.venv, ignore_errors=True)
    result = smoke_install(args.index_url, packages, args.venv, extra_index_urls=args.extra_index_url)
    print(result.summary())
    return 0 if result.ok else 1


def cmd_provenance(args) -> int:
    print(provenance(Path(args.wheel), settings(args).wheelhouse))
    return 0


PARSERS = {
    "publish": _publish_parser,
    "provenance": _provenance_parser,
    "smoke-install": _smoke_install_parser,
}


def register(sub) -> None:
    """Every command of this module, in its order."""
    for add in PARSERS.values():
        add(sub)

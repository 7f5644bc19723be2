"""``build``, ``build-all``, ``plan``, ``build-requires``: the pipeline's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..core.errors import UsageError
from ..core.recipe import Recipe, Stack, load_recipe, load_stack, parse_variant_choices
from ..core.targets import DEFAULT_TARGET
from ..pipeline.build import (BuildRequest, build_package, install_build_requirements, plan_package,
                              sdist_build_requirements)
from ..pipeline.stack_build import build_stack
from .common import fetcher_of, pinned, settings, target_of


def _common(p) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="gb10, sm120, blackwell, hopper, native")
    p.add_argument("--stack", help="stack name (default: the default stack)")
    p.add_argument("--python", default=sys.executable, help="the Python (with the stack's torch) to build with")
    p.add_argument("--wheelhouse", type=Path, default=None)
    p.add_argument("--offline", action="store_true", default=None, help="read sources only from cache/mirror")
    p.add_argument("--mirror", help="local mirror folder for air-gapped hosts")
    p.add_argument("--jobs", type=int, help="override the planned compile jobs")
    p.add_argument("--kernels", dest="kernel_set", help="FlashInfer AOT kernel set (core, decode, prefill, "
                   "default, all); default: default")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=on|off",
                   help="turn a recipe variant on or off, e.g. vllm's fa3=off (see `blackwheel recipes`)")


def _build_parser(sub) -> None:
    p = sub.add_parser("build", help="build one package of a stack for a target")
    p.add_argument("package")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical wheel exists")
    _common(p)
    p.set_defaults(func=cmd_build)


def _build_all_parser(sub) -> None:
    p = sub.add_parser("build-all", help="build every package of a stack, in dependency order")
    p.add_argument("--force", action="store_true")
    p.add_argument("--keep-going", action="store_true", help="a failed package does not stop the others")
    p.add_argument("--one-at-a-time", dest="together", action="store_false",
                   help="build the packages one after another instead of at once on one job budget")
    _common(p)
    p.set_defaults(func=cmd_build_all)


def _build_requires_parser(sub) -> None:
    p = sub.add_parser("build-requires", help="what each package's own build needs in the build Python")
    p.add_argument("packages", nargs="*", help="recipes (default: every package of the stack)")
    p.add_argument("--install", action="store_true", help="pip install --upgrade what the build Python lacks")
    _common(p)
    p.set_defaults(func=cmd_build_requires)


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show the arch flags a build would use, compiling nothing")
    p.add_argument("package")
    p.add_argument("--out", type=Path, help="where to keep the generated build file")
    _common(p)
    p.set_defaults(func=cmd_plan)


def request_from_args(args, recipe: Recipe, stack: Stack) -> BuildRequest:
    pinned(stack, recipe)
    where = settings(args)
    return BuildRequest(recipe=recipe, stack=stack, target=target_of(args.target), python=args.python,
                        wheelhouse=where.wheelhouse, workdir=where.workdir, fetcher=fetcher_of(args),
                        jobs=args.jobs, force=getattr(args, "force", False), kernel_set=args.kernel_set,
                        variant_choices=variant_choices(args, recipe, stack))


def variant_choices(args, recipe: Recipe, stack: Stack) -> tuple[tuple[str, bool], ...]:
    """The ``--variant`` choices this recipe's version declares. With several packages (build-all),
    a choice binds the packages that have that variant; a name no package has is an error."""
    choices = parse_variant_choices(getattr(args, "variant", None))
    mine = {v.name for v in recipe.version(stack.pins[recipe.name]).variants}
    if getattr(args, "package", None) is None:   # build-all
        everyone = {v.name for r in stack.recipes() for v in r.version(stack.pins[r.name]).variants}
        unknown = sorted(set(choices) - everyone)
        if unknown:
            raise UsageError(f"no package of stack {stack.name} has a variant {unknown[0]!r}")
        choices = {k: v for k, v in choices.items() if k in mine}
    recipe.version(stack.pins[recipe.name]).choose_variants(choices)   # unknown names: one line, now
    return tuple(sorted(choices.items()))


def cmd_build(args) -> int:
    stack = load_stack(args.stack)
    outcome = build_package(request_from_args(args, load_recipe(args.package), stack))
    print(outcome.wheel)
    return 0


def cmd_build_all(args) -> int:
    stack = load_stack(args.stack)
    # every request first: a bad target or recipe stops the run before the first fetch
    requests = [request_from_args(args, recipe, stack) for recipe in stack.recipes()]
    return build_stack(requests, keep_going=args.keep_going, together=args.together)[1]


def cmd_build_requires(args) -> int:
    stack = load_stack(args.stack)
    names = args.packages or [r.name for r in stack.recipes()]
    reqs: list[str] = []
    for name in names:
        reqs += sdist_build_requirements(request_from_args(args, load_recipe(name), stack))
    reqs = list(dict.fromkeys(reqs))
    if args.install:
        install_build_requirements(args.python, reqs)
    print("\n".join(reqs))
    return 0


def cmd_plan(args) -> int:
    stack = load_stack(args.stack)
    recipe = load_recipe(args.package)
    req = request_from_args(args, recipe, stack)
    out = args.out or (req.workdir / "plans" / f"{recipe.name}-{req.target.name}.ninja")
    plan = plan_package(req, out)
    print(json.dumps(plan, indent=2) if isinstance(plan, dict) else plan)   # a table (FlashInfer) as it is
    return 0


PARSERS = {
    "build": _build_parser,
    "build-all": _build_all_parser,
    "build-requires": _build_requires_parser,
    "plan": _plan_parser,
}


def register(sub) -> None:
    """Every command of this module, in its order."""
    for add in PARSERS.values():
        add(sub)

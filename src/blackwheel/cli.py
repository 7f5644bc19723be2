"""``blackwheel`` command line: dispatch only.

Each stage module that has a command exposes ``register(subparsers)``, which adds its sub-command
and sets ``func`` (taking the parsed args, returning an exit code). Errors are caught here, once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import BlackwheelError

# Stage modules with a sub-command, in the order `blackwheel --help` lists them.
COMMAND_MODULES = (
    "build",        # build, build-all, plan
    "sources",      # fetch
    "patch",        # patches (check every patch of a stack)
    "inspect",      # inspect
    "verify",       # verify, compat
    "doctor",       # doctor
    "repro",        # repro-1969
    "index",        # publish, provenance
    "gpu_report",   # report (kernel tests / bench results -> JSON, Markdown, PNG)
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackwheel",
        description="Source builds of vLLM, FlashInfer and flash-attention for Blackwell SM_120/SM_121.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"blackwheel.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BlackwheelError as exc:
        print(f"blackwheel: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("blackwheel: interrupted; nothing half-written was left in the wheelhouse", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

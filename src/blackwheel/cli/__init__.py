"""``blackwheel`` command line: dispatch only.

Each module of this package registers the commands of one stage (``register(subparsers)``), each
command a ``func`` taking the parsed args and returning an exit code. The settings are read once
here (environment, then the command's options) and errors are caught once, here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..core.errors import BlackwheelError, Interrupted
from ..toolchain.interrupt import SignalsRaise

# Sub-command -> the module of this package that registers it. Only the chosen command's module is
# imported: ``blackwheel inspect`` on a GPU-less host loads neither the pipeline nor the reports.
COMMANDS = {
    "build": ("build", "build one package of a stack for a target"),
    "build-all": ("build", "build every package of a stack, in dependency order"),
    "plan": ("build", "show the arch flags a build would use, compiling nothing"),
    "build-requires": ("build", "what each package's own build needs in the build Python (--install)"),
    "fetch": ("sources", "fetch and verify every source of a stack"),
    "bundle": ("sources", "write every pinned source of a stack and target into one file (air-gapped hosts)"),
    "patches": ("sources", "check every patch of every stack against its pinned source"),
    "inspect": ("check", "list the cubins and PTX inside wheels, .so and .o files"),
    "verify": ("check", "fail unless every CUDA object runs natively on the target's devices"),
    "compat": ("check", "what of each CUDA object runs on a compute capability, and why"),
    "doctor": ("reports", "report this machine: GPU, driver, CUDA, compiler, torch, installed kernels"),
    "repro-1969": ("reports", "reproduce flash-attention issue #1969 and prove the fix"),
    "publish": ("release", "write the static index, or upload to an index server"),
    "provenance": ("release", "print where every byte of a wheel came from"),
    "smoke-install": ("release", "install from an index into a fresh venv and import each package"),
    "report": ("reports", "turn kernel test and bench results into JSON, Markdown and PNG"),
    "test-upstream": ("reports", "run a package's own test suite against the installed wheels"),
    "bench": ("reports", "kernel throughput against this GPU's measured ceilings and torch references"),
    "bench-build": ("reports", "build speed: ours against upstream's own command, same machine, same run"),
}
# The order ``blackwheel --help`` lists them in (the epilog above keeps the order of COMMANDS).
LISTED = ("build", "build-all", "build-requires", "plan", "fetch", "bundle", "patches", "inspect", "verify",
          "compat", "doctor", "repro-1969", "publish", "provenance", "smoke-install", "report", "test-upstream",
          "bench", "bench-build")
# Commands whose one-line errors have always named them (scripts read them).
ERROR_PREFIX = {"bench": "blackwheel bench"}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackwheel",
        description="Source builds of vLLM, FlashInfer and flash-attention for Blackwell SM_120/SM_121.",
        epilog="commands:\n" + "\n".join(f"  {c:<12} {h}" for c, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [command] if command in COMMANDS else LISTED:
        importlib.import_module(f"{__name__}.{COMMANDS[name][0]}").PARSERS[name](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = make_parser(command)
    args = parser.parse_args(argv)
    try:
        args.settings = importlib.import_module(f"{__name__}.common").settings_of(args)
        with SignalsRaise():   # SIGTERM too: cleanups and ``finally`` blocks run, as for Ctrl-C
            return int(args.func(args) or 0)
    except BlackwheelError as exc:
        print(f"{ERROR_PREFIX.get(getattr(args, 'command', None), 'blackwheel')}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:   # Interrupted: a build's processes were ended on the way up
        print(f"blackwheel: {exc if isinstance(exc, Interrupted) else 'interrupted'}; nothing half-written "
              "was left in the wheelhouse", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


"""``blackwheel`` command line: dispatch only.

Each stage module that has a command exposes ``register(subparsers)``, which adds its sub-command
and sets ``func`` (taking the parsed args, returning an exit code). Errors are caught here, once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..core.errors import BlackwheelError, Interrupted
from ..toolchain.interrupt import SignalsRaise

# Sub-command -> the stage module that registers it. Only the chosen command's module is imported,
# so ``blackwheel inspect`` on a GPU-less host never imports torch-facing code.
COMMANDS = {
    "build": ("pipeline.build", "build one package of a stack for a target"),
    "build-all": ("pipeline.build", "build every package of a stack, in dependency order"),
    "plan": ("pipeline.build", "show the arch flags a build would use, compiling nothing"),
    "build-requires": ("pipeline.build", "what each package's own build needs in the build Python (--install)"),
    "fetch": ("sources.fetch", "fetch and verify every source of a stack"),
    "bundle": ("sources.bundle", "write every pinned source of a stack and target into one file (air-gapped hosts)"),
    "patches": ("sources.patch", "check every patch of every stack against its pinned source"),
    "inspect": ("check.inspect", "list the cubins and PTX inside wheels, .so and .o files"),
    "verify": ("check.verify", "fail unless every CUDA object runs natively on the target's devices"),
    "compat": ("check.verify", "what of each CUDA object runs on a compute capability, and why"),
    "doctor": ("reports.doctor", "report this machine: GPU, driver, CUDA, compiler, torch, installed kernels"),
    "repro-1969": ("reports.repro", "reproduce flash-attention issue #1969 and prove the fix"),
    "publish": ("release.index", "write the static index, or upload to an index server"),
    "provenance": ("release.index", "print where every byte of a wheel came from"),
    "smoke-install": ("release.index", "install from an index into a fresh venv and import each package"),
    "report": ("reports.gpu_report", "turn kernel test and bench results into JSON, Markdown and PNG"),
    "test-upstream": ("reports.upstream_tests", "run a package's own test suite against the installed wheels"),
}


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blackwheel",
        description="Source builds of vLLM, FlashInfer and flash-attention for Blackwell SM_120/SM_121.",
        epilog="commands:\n" + "\n".join(f"  {c:<12} {h}" for c, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command][0]] if command in COMMANDS else dict.fromkeys(m for m, _ in COMMANDS.values())
    for name in modules:
        importlib.import_module(f"blackwheel.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = make_parser(command)
    args = parser.parse_args(argv)
    try:
        with SignalsRaise():   # SIGTERM too: cleanups and ``finally`` blocks run, as for Ctrl-C
            return int(args.func(args) or 0)
    except BlackwheelError as exc:
        print(f"blackwheel: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:   # Interrupted: a build's processes were ended on the way up
        print(f"blackwheel: {exc if isinstance(exc, Interrupted) else 'interrupted'}; nothing half-written "
              "was left in the wheelhouse", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


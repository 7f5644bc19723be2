"""Errors a user can act on: each carries a one-line message and an exit code.

They are raised anywhere in the pipeline and caught once, in ``cli.main``, which prints
``blackwheel: <message>`` and exits with the code. Nothing else prints tracebacks to users.
"""

from __future__ import annotations

import signal


class BlackwheelError(Exception):
    """Base class: a clear, one-line problem with what to do about it."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return self.message.replace("\n", " ")


class UsageError(BlackwheelError):
    """Unknown package, target, stack, kernel set, --cc value..."""


class RecipeError(BlackwheelError):
    """A recipe or stack file is malformed or inconsistent."""


class StackMismatch(RecipeError):
    """A stack's pins disagree with a package's own requirements."""


class SourceError(BlackwheelError):
    """A source could not be fetched, or its bytes differ from the pin."""

    exit_code = 3


class HashMismatch(SourceError):
    pass


class MissingOffline(SourceError):
    """Offline mode and the mirror lacks a source."""


class UnsafeArchive(SourceError):
    """An archive member would land outside the extraction folder."""


class PatchError(BlackwheelError):
    """A patch does not apply: names patch, file and hunk."""

    exit_code = 4


class ToolchainError(BlackwheelError):
    """nvcc missing or the wrong CUDA major, host compiler too old, torch differs from the stack."""

    exit_code = 5


class BuildFailed(BlackwheelError):
    """The package's own build failed; message holds the first compiler error and the log path."""

    exit_code = 6


class VerifyFailed(BlackwheelError):
    """A built CUDA object lacks native code for a device of the target."""

    exit_code = 7


class PublishError(BlackwheelError):
    exit_code = 8


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: what the build started has been ended (``toolchain.interrupt``).

    A KeyboardInterrupt, not a BlackwheelError, so no ``except Exception`` on its way up to
    ``cli.main`` swallows it; the exit code is the shell's for a signal, 128 + its number.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"

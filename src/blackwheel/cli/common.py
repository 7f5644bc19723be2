"""What every command shares: the settings read once, the target, the fetcher."""

from __future__ import annotations

import argparse

from ..core.errors import UsageError
from ..core.recipe import Recipe, Stack
from ..core.settings import Settings
from ..core.targets import Target, resolve_target
from ..sources.fetch import Fetcher
from ..toolchain.machine import detect_compute_capability

# Options that override the setting of the same name (``Settings.with_options``).
SETTING_OPTIONS = ("mirror", "offline", "allow_absent", "wheelhouse")


def settings_of(args: argparse.Namespace) -> Settings:
    """The environment with this command's options over it: read once, in ``cli.main``."""
    return Settings.from_env().with_options(**{k: getattr(args, k, None) for k in SETTING_OPTIONS})


def target_of(name: str) -> Target:
    """A target by name; ``native`` reads the visible GPU through the machine probe."""
    return resolve_target(name, detect_compute_capability)


def pinned(stack: Stack, recipe: Recipe) -> str:
    """The stack's version of ``recipe``, or a one-line refusal."""
    if recipe.name not in stack.pins:
        raise UsageError(f"stack {stack.name} pins no version of {recipe.name}")
    return stack.pins[recipe.name]


def settings(args: argparse.Namespace) -> Settings:
    """The settings ``main`` read once; a command called without ``main`` (a test) reads them now."""
    if getattr(args, "settings", None) is None:
        args.settings = settings_of(args)
    return args.settings


def fetcher_of(args: argparse.Namespace) -> Fetcher:
    return Fetcher.from_settings(settings(args))

"""The builder interface: what the pipeline asks of every package's own build.

A builder is named by a recipe (``[package] builder = "..."``) and implements ``Builder``:

- ``key``: what it adds to the build key (an input of its own that changes the wheel);
- ``environment``: the build environment, adjusted for its build (the pipeline made it from the
  toolchain and the recipe's ``[env]``);
- ``plan``: what a build would do, compiling nothing (``blackwheel plan`` prints it: a dict as JSON);
- ``build``: the package's own build, from a prepared tree to one wheel in ``out``; returns what it
  produced (``Built``): the run's measurements, and its own section of the manifest.

The pipeline (``pipeline.build``) prepares the tree before and retags, verifies and places the wheel
after; it knows no package. ``builders/__init__.py`` holds the table of builders by name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from ..core.recipe import Recipe, Stack
from ..core.settings import Settings
from ..core.targets import Target
from ..sources.fetch import Fetcher
from ..toolchain.progress import RunResult
from ..toolchain.toolchain import Toolchain


@dataclass(frozen=True)
class BuildRequest:
    recipe: Recipe
    stack: Stack
    target: Target
    python: str = sys.executable
    wheelhouse: Path = field(default_factory=lambda: Settings.from_env().wheelhouse)
    workdir: Path = field(default_factory=lambda: Settings.from_env().workdir)
    fetcher: Fetcher = field(default_factory=Fetcher.from_env)
    jobs: int | None = None
    force: bool = False
    live: bool | None = None
    kernel_set: str | None = None   # FlashInfer: which AOT kernel set (recipe [kernel-sets])
    variant_choices: tuple[tuple[str, bool], ...] = ()   # `--variant NAME=on|off`; the rest default
    extra_env: dict = field(default_factory=dict, hash=False, compare=False)   # e.g. a shared jobserver

    @property
    def version(self):
        return self.recipe.version(self.stack.pins[self.recipe.name])

    @property
    def label(self) -> str:
        return f"{self.recipe.name} {self.version.version} [{self.target.name}]"

    @property
    def variants(self) -> dict[str, bool]:
        """Every variant of the version, on or off (an unknown name is a one-line error)."""
        return self.version.choose_variants(dict(self.variant_choices))

    @property
    def variant_tags(self) -> list[str]:
        """``nofa3``-style tags of the variants not at their default (wheel version, work folder)."""
        chosen = self.variants
        return [v.tag(chosen[v.name]) for v in self.version.variants if chosen[v.name] != v.default]

    def variant_env(self) -> dict[str, str]:
        chosen = self.variants
        return {k: val for v in self.version.variants for k, val in v.env_for(chosen[v.name]).items()}


@dataclass(frozen=True)
class Prepared:
    """A tree ready to build, as ``plan`` gets it from the pipeline: patched sources and their env."""

    tree: Path
    env: dict[str, str]
    work: Path            # a scratch folder of this plan (logs, the kept build file)
    toolchain: Toolchain


@dataclass
class Built:
    """What a builder produced: the run (exit status, wall, peak memory, units, first error) and its
    own section of the manifest (FlashInfer: ``{"aot": ...}``)."""

    run: RunResult
    manifest: dict = field(default_factory=dict)


class Builder(Protocol):
    name: ClassVar[str]

    def key(self, req: BuildRequest) -> dict:
        """Build-key inputs of this builder's own (merged into the pipeline's)."""

    def environment(self, req: BuildRequest, toolchain: Toolchain, base: dict[str, str],
                    env: dict[str, str]) -> dict[str, str]:
        """``env`` (``base``, the toolchain's, with the recipe's ``[env]`` over it) for this build."""

    def plan(self, req: BuildRequest, out: Path, prepare: Callable[[], Prepared]) -> dict | str:
        """What a build would do, compiling nothing (a dict: facts; a str: a table to read);
        ``prepare`` fetches and patches when the builder needs the tree."""

    def build(self, req: BuildRequest, tree: Path, env: dict[str, str], out: Path, log: Path) -> Built:
        """The package's own build of ``tree`` into one wheel in ``out``, logged to ``log``."""

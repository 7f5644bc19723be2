"""A pinned input of a build, as a recipe declares it: an sdist, a git tree or an archive.

Recipes (``core.recipe``) declare them and the fetch stage (``sources.fetch``) brings them in; the
declaration lives here, below both, so neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

GIT_COMMIT_LEN = 40
HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Source:
    """One pinned input of a build: an sdist, a git tree or an archive."""

    name: str
    kind: str                      # "pypi" | "git" | "url"
    sha256: str                    # archive hash (pypi, url) or tree_sha256 (git; "" = by commit only)
    pypi: str | None = None        # distribution name (pypi)
    version: str | None = None     # version (pypi)
    url: str | None = None         # repository URL (git) or archive URL (url)
    commit: str | None = None      # full commit id (git)
    submodules: bool = False       # git: check out submodules at their recorded commits
    submodule_paths: tuple[str, ...] = ()  # git: only these submodules (empty: all, when submodules)
    role: str = "sdist"            # "sdist" | "resource"
    env: str | None = None         # resource: the variable that points the build at it
    dest: str | None = None        # resource: a path inside the main tree to place it at instead
    defined_in: str | None = None  # resource: where upstream defines this pin
    when: dict = field(default_factory=dict, hash=False, compare=False)
    optional: str | None = None    # resource: what the build lacks without it (it may be missing)
    libraries: tuple[str, ...] = ()  # resource: wheel libraries built from it (not expected when left out)

    @property
    def pinned(self) -> bool:
        """Archives need a sha256; a git resource is pinned by its commit alone."""
        return self.kind == "git" or bool(HEX64.fullmatch(self.sha256))

    @property
    def submodule_spec(self):
        """``submodules`` as the recipe wrote it: False, True (all recorded) or a list of paths."""
        return list(self.submodule_paths) if self.submodule_paths else self.submodules

    @property
    def label(self) -> str:
        if self.kind == "pypi":
            return f"{self.pypi}=={self.version} (sdist)"
        if self.kind == "git":
            return f"{self.name} {self.url}@{self.commit}"
        return f"{self.name} {self.url}"

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "sha256": self.sha256, "role": self.role}
        if self.kind == "git" and self.submodule_spec:
            d["submodules"] = self.submodule_spec
        for key in ("pypi", "version", "url", "commit", "env", "dest"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d

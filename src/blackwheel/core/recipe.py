"""Recipes and stacks: declarative TOML in ``recipes/`` loaded into frozen objects.

A recipe (``recipes/<name>.toml``) says what is built from what: versions with their sdist pin,
auxiliary sources (``resources``) with their pins, the patch series with conditions, how a target
becomes the package's arch knob, build knobs, and what the wheel must contain. A stack
(``recipes/stacks/<name>.toml``) pins one consistent version of torch and of every recipe.
"""

from __future__ import annotations

import re
import tomllib
from email.parser import HeaderParser
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import RecipeError, UsageError
from .settings import Settings
from .source import GIT_COMMIT_LEN, HEX64, Source
from .targets import TARGETS, CudaArch, Target, parse_arch_list, spell

def recipes_dir() -> Path:
    return Settings.from_env().recipes


def patches_dir() -> Path:
    return Settings.from_env().patches


@dataclass(frozen=True)
class Condition:
    """``when = { target = [...], torch = ">=2.14", archs = ["9.0a", "10.0f"] }``; empty always holds.

    ``archs`` holds when the recipe's arch list for the target has an arch that one of these
    serves, as vLLM's ``cuda_archs_loose_intersection`` maps them: ``X.Ya`` serves X.Y only, a
    plain or family ``X.Y`` serves X.Y and later minors of major X.
    """

    targets: tuple[str, ...] = ()
    torch: SpecifierSet | None = None
    archs: tuple[CudaArch, ...] = ()

    @classmethod
    def from_toml(cls, data: dict | None, where: str) -> "Condition":
        data = dict(data or {})
        targets = data.pop("target", ())
        targets = (targets,) if isinstance(targets, str) else tuple(targets)  # target = "gb10" too
        torch = data.pop("torch", None)
        archs = data.pop("archs", ())
        if data:
            raise RecipeError(f"{where}: unknown condition keys {sorted(data)} (target, torch, archs)")
        for t in targets:
            if t not in TARGETS:
                raise RecipeError(f"{where}: condition names unknown target {t!r}")
        try:
            return cls(targets, SpecifierSet(torch) if torch else None, parse_arch_list(archs))
        except InvalidSpecifier:
            raise RecipeError(f"{where}: bad torch specifier {torch!r}") from None
        except UsageError as exc:
            raise RecipeError(f"{where}: {exc}") from None

    def holds(self, target: Target, torch_version: str, target_archs: tuple[CudaArch, ...] = ()) -> bool:
        """``target_archs``: the recipe's arch list for the target (needed by an ``archs`` condition)."""
        if self.targets and target.name not in self.targets:
            return False
        if self.archs and not any(serves(a, t) for a in self.archs for t in target_archs):
            return False
        return self.holds_torch(torch_version)

    def holds_torch(self, torch_version: str) -> bool:
        return self.torch is None or Version(Version(torch_version).base_version) in self.torch

    def __str__(self) -> str:
        parts = []
        if self.targets:
            parts.append("target in " + ",".join(self.targets))
        if self.torch is not None:
            parts.append(f"torch {self.torch}")
        if self.archs:
            parts.append("an arch served by " + ";".join(a.dotted for a in self.archs))
        return " and ".join(parts) or "always"


def serves(listed: CudaArch, target_arch: CudaArch) -> bool:
    """Whether a family list entry ``listed`` maps onto ``target_arch`` (vLLM's loose intersection).

    >>> serves(CudaArch.parse("9.0a"), CudaArch.parse("9.0a")), serves(CudaArch.parse("9.0a"), CudaArch.parse("12.1a"))
    (True, False)
    >>> serves(CudaArch.parse("10.0f"), CudaArch.parse("10.3")), serves(CudaArch.parse("12.0f"), CudaArch.parse("12.1a"))
    (True, True)
    """
    if listed.major != target_arch.major:
        return False
    if listed.suffix == "a":
        return listed.minor == target_arch.minor
    return target_arch.minor >= listed.minor


@dataclass(frozen=True)
class PatchSpec:
    file: Path
    when: Condition = Condition()


@dataclass(frozen=True)
class UpstreamTests:
    """Upstream's own tests for a version: where they live and which files prove our wheels.

    ``source`` None: the sdist carries them (vLLM's tests/kernels); else a pinned git tree (FlashInfer
    keeps its tests out of the sdist). Never fetched for a build."""

    paths: tuple[str, ...]
    source: Source | None = None
    env: dict = field(default_factory=dict, hash=False, compare=False)
    trace: str | None = None    # ``module:Class.method`` every compiled-module load goes through


@dataclass(frozen=True)
class Variant:
    """A build option a user may turn on or off, like Spack's ``variant``: ``--variant fa3=off``.

    A variant changes what is built, so it is part of the build key and, when not at its default,
    of the wheel's local version (``+cu130.sm90.nofa3``): the two builds never share a file."""

    name: str
    default: bool
    description: str
    env_on: dict = field(default_factory=dict, hash=False, compare=False)    # build environment when on
    env_off: dict = field(default_factory=dict, hash=False, compare=False)   # ... and when off
    libraries: tuple[str, ...] = ()   # wheel libraries built only when on (not expected when off)

    def env_for(self, on: bool) -> dict:
        return dict(self.env_on if on else self.env_off)

    def tag(self, on: bool) -> str:
        """The wheel's local-version part when the variant is not at its default."""
        return f"{'with' if on else 'no'}{re.sub(r'[^a-z0-9]', '', self.name.lower())}"


@dataclass(frozen=True)
class RecipeVersion:
    version: str
    sdist: Source
    resources: tuple[Source, ...] = ()
    patches: tuple[PatchSpec, ...] = ()
    gcc: SpecifierSet | None = None          # host compiler the version needs
    requirements_files: tuple[str, ...] = ()  # files in the sdist whose pins the stack must satisfy
    tests: UpstreamTests | None = None        # upstream's own test suite (`blackwheel test-upstream`)
    variants: tuple[Variant, ...] = ()        # build options (`--variant NAME=on|off`)

    def choose_variants(self, choices: dict[str, bool]) -> dict[str, bool]:
        """Every variant of this version, on or off: the user's choice, else its default."""
        known = {v.name for v in self.variants}
        unknown = sorted(set(choices) - known)
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise UsageError(f"version {self.version} has no variant {unknown[0]!r} (variants: {have})")
        return {v.name: choices.get(v.name, v.default) for v in self.variants}

    def resources_for(self, target: Target, torch_version: str,
                      target_archs: tuple[CudaArch, ...] = ()) -> tuple[Source, ...]:
        """The resources the target uses (``when``); ``target_archs``: the recipe's list for it."""
        return tuple(r for r in self.resources
                     if Condition.from_toml(r.when, r.name).holds(target, torch_version, target_archs))

    def patches_for(self, target: Target, torch_version: str) -> tuple[PatchSpec, ...]:
        return tuple(p for p in self.patches if p.when.holds(target, torch_version))


@dataclass(frozen=True)
class ArchKnob:
    """How a target becomes this package's arch setting."""

    knob: str
    style: str
    separator: str
    targets: dict[str, tuple[CudaArch, ...]]

    def archs_for(self, target: Target) -> tuple[CudaArch, ...]:
        if target.name in self.targets:
            return self.targets[target.name]
        # ``native`` on a device with no named target: plain code for it
        return tuple(CudaArch(cc.major, cc.minor) for cc in target.devices)

    def value_for(self, target: Target) -> str:
        return spell(self.archs_for(target), self.style, self.separator)


@dataclass(frozen=True)
class Recipe:
    name: str
    dist_name: str
    import_name: str
    builder: str
    versions: tuple[RecipeVersion, ...]
    arch: ArchKnob
    env: dict[str, str]
    expect: dict
    path: Path
    depends: tuple[str, ...] = ()
    jobs_style: str = "torch-ext"     # how MAX_JOBS is read: "torch-ext" or "vllm" (divided by NVCC_THREADS)
    build_requires: tuple[str, ...] = ()
    # [split-compile] threads: nvcc -split-compile=N on the long units, when they bound the build (0: never)
    split_compile: int = 0
    # [package] links-torch: the wheel's libraries link libtorch, so they load only beside the torch
    # they were built against; the wheel's version names that torch and its metadata requires it
    links_torch: bool = False
    # the recipe file as read, once: the tables only its builder reads ([aot], [kernel-sets], ...)
    data: Mapping = field(default_factory=dict, hash=False, compare=False)

    def sources_for(self, version: str, target: Target, torch_version: str) -> tuple[Source, ...]:
        """The sdist and every resource a build of ``version`` for ``target`` needs."""
        rv = self.version(version)
        return (rv.sdist, *rv.resources_for(target, torch_version, self.arch.archs_for(target)))

    def version(self, version: str) -> RecipeVersion:
        for v in self.versions:
            if v.version == version:
                return v
        known = ", ".join(v.version for v in self.versions)
        raise UsageError(f"recipe {self.name} has no version {version!r}; it knows: {known}")


# ---- loading -------------------------------------------------------------------------------------
def _source_from_toml(d: dict, name: str, role: str, where: str) -> Source:
    d = dict(d)
    when = d.pop("when", {})
    if "pypi" in d:
        src = Source(name=name, kind="pypi", pypi=d["pypi"], version=d.get("version"),
                     sha256=d.get("sha256", ""), role=role, when=when)
    elif "git" in d:
        commit = d.get("commit", "")
        if len(commit) != GIT_COMMIT_LEN or any(c not in "0123456789abcdef" for c in commit):
            raise RecipeError(f"{where}: git source {name!r} needs a full 40-hex commit, got {commit!r}")
        subs = d.get("submodules", False)  # false, true (all recorded) or a list of paths
        src = Source(name=name, kind="git", url=d["git"], commit=commit, sha256=d.get("sha256", ""),
                     submodules=bool(subs), submodule_paths=tuple(subs) if isinstance(subs, list) else (),
                     role=role, env=d.get("env"),
                     dest=d.get("dest"), defined_in=d.get("defined-in"), when=when,
                     optional=d.get("optional"), libraries=tuple(d.get("libraries", ())))
    elif "url" in d:
        src = Source(name=name, kind="url", url=d["url"], sha256=d.get("sha256", ""), role=role,
                     env=d.get("env"), dest=d.get("dest"), defined_in=d.get("defined-in"), when=when,
                     optional=d.get("optional"), libraries=tuple(d.get("libraries", ())))
    else:
        raise RecipeError(f"{where}: source {name!r} needs one of pypi, git, url")
    if src.optional is not None and (role == "sdist" or not isinstance(src.optional, str)):
        raise RecipeError(f"{where}: optional = \"<what the build lacks without it>\" is for resources")
    # git: pinned by the commit; a tree sha256 is checked where recorded. Archives need a sha256,
    # or (resources only) an explicit "unpinned: <why>", which fetch refuses unless optional.
    if src.kind == "git" and src.sha256 == "":
        pass
    elif src.sha256.startswith("unpinned:"):
        if role == "sdist":
            raise RecipeError(f"{where}: the sdist of {name!r} must have a sha256 pin")
    elif not HEX64.fullmatch(src.sha256):
        raise RecipeError(f"{where}: source {name!r} has no sha256 pin (64 lowercase hex), got {src.sha256!r}")
    Condition.from_toml(when, f"{where} {name}")  # a bad condition fails at load, not mid-build
    return src


def _version_from_toml(d: dict, recipe_name: str, where: str) -> RecipeVersion:
    ver = d["version"]
    try:
        Version(ver)
    except InvalidVersion:
        raise RecipeError(f"{where}: bad version {ver!r}") from None
    sdist = _source_from_toml({**d["sdist"], "version": ver}, recipe_name, "sdist", where)
    resources = tuple(_source_from_toml(r, r["name"], "resource", where)
                      for r in (dict(x) for x in d.get("resources", ())))
    pdir = patches_dir() / recipe_name / ver
    patches = []
    for p in d.get("patches", ()):
        path = pdir / p["file"]
        if not path.is_file():
            raise RecipeError(f"{where}: patch {path} does not exist")
        patches.append(PatchSpec(path, Condition.from_toml(p.get("when"), f"{where} {p['file']}")))
    gcc = SpecifierSet(d["gcc"]) if d.get("gcc") else None
    return RecipeVersion(ver, sdist, resources, tuple(patches), gcc,
                         tuple(d.get("requirements-files", ())), _tests_from_toml(d.get("tests"), recipe_name, where),
                         tuple(_variant_from_toml(v, where) for v in d.get("variants", ())))


def _variant_from_toml(d: dict, where: str) -> Variant:
    d = dict(d)
    name, default = d.pop("name", None), d.pop("default", None)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise RecipeError(f"{where}: a variant needs a lowercase name, got {name!r}")
    if not isinstance(default, bool):
        raise RecipeError(f"{where}: variant {name!r} needs default = true or false")
    env_on, env_off = d.pop("env-on", {}), d.pop("env-off", {})
    description = d.pop("description", "")
    libraries = d.pop("libraries", [])
    if not isinstance(libraries, list) or not all(isinstance(g, str) for g in libraries):
        raise RecipeError(f"{where}: variant {name!r}: libraries = [\"<glob in the wheel>\", ...]")
    if d:
        raise RecipeError(f"{where}: variant {name!r}: unknown keys {sorted(d)}")
    if not env_on and not env_off:
        raise RecipeError(f"{where}: variant {name!r} changes nothing (give env-on or env-off)")
    return Variant(name, default, description, {k: str(v) for k, v in env_on.items()},
                   {k: str(v) for k, v in env_off.items()}, tuple(libraries))


def parse_variant_choices(specs) -> dict[str, bool]:
    """``["fa3=off", "foo=on"]`` -> ``{"fa3": False, "foo": True}``; a bad spelling is one line."""
    out: dict[str, bool] = {}
    for spec in specs or ():
        name, sep, value = spec.partition("=")
        if not sep or value.lower() not in ("on", "off", "true", "false", "1", "0"):
            raise UsageError(f"--variant {spec!r}: write NAME=on or NAME=off")
        out[name.strip()] = value.lower() in ("on", "true", "1")
    return out


def _tests_from_toml(d: dict | None, recipe_name: str, where: str) -> UpstreamTests | None:
    if not d:
        return None
    d = dict(d)
    paths, env = tuple(d.pop("paths", ())), {k: str(v) for k, v in d.pop("env", {}).items()}
    trace = d.pop("trace", None)
    if not paths or any(not p.startswith("tests/") for p in paths):
        raise RecipeError(f"{where}: [versions.tests] needs paths under tests/, got {list(paths)}")
    if trace is not None and not re.fullmatch(r"[\w.]+:\w+\.\w+", trace):
        raise RecipeError(f"{where}: [versions.tests] trace must read module:Class.method, got {trace!r}")
    source = _source_from_toml(d, f"{recipe_name}-tests", "tests", where) if d else None
    return UpstreamTests(paths, source, env, trace)


def _split_compile_from_toml(d: dict | None, where: str) -> int:
    """``[split-compile] threads = N``: N nvcc threads for each long unit (``nvcc -split-compile=N``)."""
    if d is None:
        return 0
    d = dict(d)
    threads = d.pop("threads", None)
    if d:
        raise RecipeError(f"{where}: [split-compile] has unknown keys {sorted(d)} (threads)")
    if type(threads) is not int or threads < 2:
        raise RecipeError(f"{where}: [split-compile] threads must be a whole number >= 2, got {threads!r}")
    return threads


def _bool_from_toml(table: dict, key: str, where: str) -> bool:
    value = table.get(key, False)
    if type(value) is not bool:
        raise RecipeError(f"{where} {key} must be true or false, got {value!r}")
    return value


def load_recipe(name: str) -> Recipe:
    path = recipes_dir() / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(recipe_names()) or "none"
        raise UsageError(f"unknown package {name!r}; recipes: {known}")
    data = _read_toml(path)
    where = str(path)
    pkg = data.get("package", {})
    arch = data.get("arch", {})
    try:
        knob = ArchKnob(arch["knob"], arch.get("style", "dotted"), arch.get("separator", ";"),
                        {t: parse_arch_list(v) for t, v in arch.get("targets", {}).items()})
        return Recipe(
            name=pkg.get("name", name), dist_name=pkg.get("dist-name", pkg.get("name", name)),
            import_name=pkg["import-name"], builder=pkg.get("builder", "pip-wheel"),
            versions=tuple(_version_from_toml(v, name, where) for v in data["versions"]),
            arch=knob, env={k: str(v) for k, v in data.get("env", {}).items()},
            expect=data.get("expect", {}), path=path, depends=tuple(pkg.get("depends", ())),
            jobs_style=pkg.get("jobs-style", "torch-ext"),
            build_requires=tuple(pkg.get("build-requires", ())),
            split_compile=_split_compile_from_toml(data.get("split-compile"), where),
            links_torch=_bool_from_toml(pkg, "links-torch", f"{where}: [package]"),
            data=MappingProxyType(data),
        )
    except KeyError as exc:
        raise RecipeError(f"{where}: missing key {exc}") from None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


# ---- stacks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stack:
    name: str
    cuda: str
    torch: str
    pins: dict[str, str]          # recipe name -> version (torch excluded)
    path: Path
    default: bool = False

    def recipes(self) -> list[Recipe]:
        """The stack's recipes in dependency order (a recipe after those it depends on)."""
        loaded = {n: load_recipe(n) for n in self.pins}
        order: list[str] = []

        def visit(n: str, seen: tuple[str, ...] = ()) -> None:
            if n in order:
                return
            if n in seen:
                raise RecipeError(f"recipes depend on each other in a cycle: {' -> '.join(seen + (n,))}")
            for dep in loaded[n].depends:
                if dep in loaded:
                    visit(dep, seen + (n,))
            order.append(n)

        for n in loaded:
            visit(n)
        return [loaded[n] for n in order]


def stacks_dir() -> Path:
    return recipes_dir() / "stacks"


def stack_names() -> list[str]:
    return sorted(p.stem for p in stacks_dir().glob("*.toml"))


def load_stack(name: str | None = None) -> Stack:
    if name is None:
        name = default_stack_name()
    path = stacks_dir() / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"unknown stack {name!r}; stacks: {', '.join(stack_names())}")
    data = _read_toml(path)
    pins = dict(data.get("pins", {}))
    if "torch" not in pins:
        raise RecipeError(f"{path}: a stack must pin torch")
    torch = pins.pop("torch")
    return Stack(data.get("name", name), data.get("cuda", "13.0"), torch, pins, path,
                 bool(data.get("default")))


def default_stack_name() -> str:
    defaults = [n for n in stack_names() if _read_toml(stacks_dir() / f"{n}.toml").get("default")]
    if len(defaults) != 1:
        raise RecipeError(f"exactly one stack must say default = true; found {defaults or 'none'}")
    return defaults[0]


# ---- stack pins against the packages' own requirements ---------------------------------------------
def sdist_requirements(tree: Path, recipe: Recipe, version: str | None = None) -> list[str]:
    """Requires-Dist of the sdist's PKG-INFO plus the requirements files the recipe names.

    Those are ``requirements-files`` of the version (``[[versions]]``) and of ``[expect]``; a
    ``pyproject.toml`` among them contributes ``build-system.requires`` and ``project.dependencies``.
    """
    reqs: list[str] = []
    pkg_info = tree / "PKG-INFO"
    if pkg_info.is_file():
        reqs += HeaderParser().parsestr(pkg_info.read_text(errors="replace")).get_all("Requires-Dist") or []
    files = list(recipe.expect.get("requirements-files", []))
    if version is not None and any(v.version == version for v in recipe.versions):
        files += recipe.version(version).requirements_files
    for rel in dict.fromkeys(files):
        path = tree / rel
        if path.is_file():
            reqs += requirement_lines(path)
    return [r for r in reqs if r]


def requirement_lines(path: Path) -> list[str]:
    if path.name == "pyproject.toml":
        data = _read_toml(path)
        return [*data.get("build-system", {}).get("requires", []), *data.get("project", {}).get("dependencies", [])]
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith(("#", "-"))]


def stack_disagreements(stack: Stack, recipe: Recipe, tree: Path) -> list[str]:
    """Each requirement of ``recipe``'s sdist that a stack pin does not satisfy, as a sentence."""
    pinned = {"torch": stack.torch}
    for name, version in stack.pins.items():
        if name == recipe.name:
            continue
        try:
            pinned[canonicalize_name(load_recipe(name).dist_name)] = version
        except UsageError:
            continue
    out = []
    for line in sdist_requirements(tree, recipe, stack.pins.get(recipe.name)):
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        name = canonicalize_name(req.name)
        if name in pinned and req.specifier and not req.specifier.contains(pinned[name], prereleases=True):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                out.append(f"{recipe.name} {recipe_version_hint(stack, recipe)} requires {req.name}"
                           f"{req.specifier}, the stack pins {pinned[name]}")
    return out


def recipe_version_hint(stack: Stack, recipe: Recipe) -> str:
    return stack.pins.get(recipe.name, "?")

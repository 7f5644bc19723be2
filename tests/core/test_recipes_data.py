"""The shipped data: every recipe in recipes/, every patch in patches/, every stack in recipes/stacks/.

Generic over ``recipe_names()`` and ``stack_names()``: a recipe added later is checked the same way.
The central check: for every recipe and every named target, the declared arch list gives native code
to every device of the target (this is what catches ``12.0a`` given to ``blackwell`` or ``gb10``).
"""

from __future__ import annotations

import re
import tomllib

import pytest

from blackwheel.sources.patch import read_header
from blackwheel.core.recipe import (default_stack_name, load_recipe, load_stack, patches_dir, recipe_names,
                               recipes_dir, stack_names)
from blackwheel.core.targets import TARGETS

HEX64 = re.compile(r"[0-9a-f]{64}")
RECIPES = recipe_names()
STACKS = stack_names()
PAIRS = [(r, t) for r in RECIPES for t in TARGETS]


def test_the_shipped_recipes_are_found():
    assert "flash-attn" in RECIPES and len(STACKS) >= 1


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe.versions, f"{name}: no versions"
    assert recipe.arch.knob


@pytest.mark.parametrize("name, target", PAIRS)
def test_arch_list_covers_every_device_of_the_target(name, target):
    t = TARGETS[target]
    archs = load_recipe(name).arch.archs_for(t)
    assert archs, f"{name}: empty arch list for {target}"
    missing = t.uncovered(archs)
    assert missing == [], (f"{name}: arch list {[str(a) for a in archs]} for target {target} gives no native "
                           f"code to {[str(cc) for cc in missing]}")


@pytest.mark.parametrize("name", RECIPES)
def test_arch_table_names_every_target(name):
    """A target the table leaves out would silently fall back to plain code."""
    assert set(load_recipe(name).arch.targets) >= set(TARGETS)


@pytest.mark.parametrize("name", RECIPES)
def test_listed_patches_exist_with_a_header(name):
    for v in load_recipe(name).versions:
        for spec in v.patches:
            assert spec.file.is_file()
            header = read_header(spec.file)
            assert all(header.fields[k] for k in ("Why", "Upstream", "Applies-when")), spec.file.name
            assert re.fullmatch(r"\d{4}-[\w.-]+\.patch", spec.file.name), spec.file.name


@pytest.mark.parametrize("name", RECIPES)
def test_every_patch_file_is_listed(name):
    """A .patch in patches/<pkg>/<ver>/ that the recipe does not list would silently never apply."""
    recipe = load_recipe(name)
    listed = {spec.file.name for v in recipe.versions for spec in v.patches}
    on_disk = {p.name for p in (patches_dir() / name).glob("*/*.patch")}
    assert on_disk <= listed, f"{name}: not in the recipe: {sorted(on_disk - listed)}"
    versions = {v.version for v in recipe.versions}
    folders = {p.name for p in (patches_dir() / name).iterdir()} if (patches_dir() / name).is_dir() else set()
    assert folders <= versions, f"{name}: patch folders for unknown versions {sorted(folders - versions)}"


def test_no_patches_for_unknown_packages():
    assert {p.name for p in patches_dir().iterdir() if p.is_dir()} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_sha256_pins(name):
    """64 lowercase hex; a git resource may rest on its 40-hex commit alone; an archive resource may
    say ``unpinned: <why>`` (fetch refuses it, unless it is optional). Read from the raw TOML."""
    raw = tomllib.loads((recipes_dir() / f"{name}.toml").read_text())
    for v in raw["versions"]:
        assert HEX64.fullmatch(v["sdist"].get("sha256", "")), f"{name} {v['version']}: sdist sha256"
        for r in v.get("resources", ()):
            sha = r.get("sha256", "")
            by_commit = "git" in r and re.fullmatch(r"[0-9a-f]{40}", r.get("commit", "")) and sha == ""
            assert HEX64.fullmatch(sha) or by_commit or re.match(r"unpinned: \S", sha), f"{name} {r['name']}: {sha!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_versions_are_distinct_and_newest_first(name):
    from packaging.version import Version

    versions = [Version(v.version) for v in load_recipe(name).versions]
    assert versions == sorted(set(versions), reverse=True)


@pytest.mark.parametrize("stack", STACKS)
def test_stack_pins_known_recipes_at_known_versions(stack):
    s = load_stack(stack)
    assert s.torch and re.fullmatch(r"\d+\.\d+\.\d+", s.torch), s.torch
    assert s.cuda.startswith("13."), s.cuda
    for name, version in s.pins.items():
        assert name in RECIPES, f"stack {stack} pins {name}, which has no recipe"
        load_recipe(name).version(version)           # raises naming the known versions
    assert [r.name for r in s.recipes()]            # dependency order resolves


@pytest.mark.parametrize("stack", STACKS)
def test_stack_dependencies_are_in_the_stack(stack):
    s = load_stack(stack)
    for r in s.recipes():
        assert set(r.depends) <= set(s.pins), f"{stack}: {r.name} depends on {r.depends}"


def test_exactly_one_default_stack():
    defaults = [n for n in STACKS if load_stack(n).default]
    assert defaults == [default_stack_name()]

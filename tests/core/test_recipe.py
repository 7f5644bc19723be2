"""recipe.py: conditions, recipe and stack loading (and their errors), dependency order, stack pins
against a package's own requirements. Every test writes its own recipes/ and patches/ in tmp_path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from blackwheel.core.errors import RecipeError, UsageError
from blackwheel.core.recipe import (Condition, default_stack_name, load_recipe, load_stack, recipe_names,
                               sdist_requirements, stack_disagreements)
from blackwheel.core.targets import TARGETS, CudaArch, Target, ComputeCapability

SHA = "ab" * 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PATCH = """From 0 Mon Sep 17 00:00:00 2001
Subject: [PATCH] x

Why: test
Upstream: none
Applies-when: always
---
"""


def recipe_toml(name: str = "pkg", version: str = "1.0", sdist: str | None = None, extra_version: str = "",
                depends: tuple[str, ...] = (), dist_name: str | None = None, tail: str = "") -> str:
    sdist = sdist if sdist is not None else f'{{ pypi = "{dist_name or name}", sha256 = "{SHA}" }}'
    return textwrap.dedent(f"""
        [package]
        name = "{name}"
        dist-name = "{dist_name or name}"
        import-name = "{name.replace('-', '_')}"
        depends = {list(depends)!r}

        [[versions]]
        version = "{version}"
        sdist = {sdist}
        """).replace("'", '"') + textwrap.dedent(extra_version) + textwrap.dedent("""
        [arch]
        knob = "TORCH_CUDA_ARCH_LIST"
        targets = { gb10 = ["12.1a"], blackwell = ["12.0f"] }
        """) + textwrap.dedent(tail)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """An empty recipes/ (with stacks/) and patches/ that the loader reads instead of the project's."""
    recipes, patches = tmp_path / "recipes", tmp_path / "patches"
    (recipes / "stacks").mkdir(parents=True)
    patches.mkdir()
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(recipes))
    monkeypatch.setenv("BLACKWHEEL_PATCHES", str(patches))
    return tmp_path


def write_recipe(tree: Path, name: str, text: str) -> None:
    (tree / "recipes" / f"{name}.toml").write_text(text)


def write_stack(tree: Path, name: str, pins: dict[str, str], default: bool = False) -> None:
    lines = [f'name = "{name}"', 'cuda = "13.0"', f"default = {'true' if default else 'false'}", "[pins]"]
    lines += [f'"{k}" = "{v}"' for k, v in pins.items()]
    (tree / "recipes" / "stacks" / f"{name}.toml").write_text("\n".join(lines) + "\n")


# ---- conditions --------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, torch, holds", [
    (">=2.14", "2.14.0", True),
    (">=2.14", "2.14.1+cu130", True),     # a local version still satisfies a public specifier
    (">=2.14", "2.13.0", False),
    ("==2.14.1", "2.14.1+cu130", True),
    ("<2.14", "2.14.0a0+git123", False),  # a pre-release torch counts as its release
    ("~=2.11.0", "2.11.0+cu130", True),
])
def test_condition_torch(spec, torch, holds):
    cond = Condition.from_toml({"torch": spec}, "x")
    assert cond.holds(TARGETS["gb10"], torch) is holds
    assert cond.holds_torch(torch) is holds


def test_condition_targets():
    cond = Condition.from_toml({"target": ["gb10", "blackwell"]}, "x")
    assert cond.holds(TARGETS["gb10"], "2.11.0")
    assert cond.holds(TARGETS["blackwell"], "2.11.0")
    assert not cond.holds(TARGETS["hopper"], "2.11.0")
    # a native target on a device with no named target is none of the listed ones
    assert not cond.holds(Target("sm89", (ComputeCapability(8, 9),), ""), "2.11.0")
    assert str(cond) == "target in gb10,blackwell"


def test_condition_single_target_string():
    cond = Condition.from_toml({"target": "gb10", "torch": ">=2.14"}, "x")
    assert cond.targets == ("gb10",)
    assert cond.holds(TARGETS["gb10"], "2.14.0") and not cond.holds(TARGETS["gb10"], "2.11.0")
    assert str(cond) == "target in gb10 and torch >=2.14"


def test_empty_condition_always_holds():
    cond = Condition.from_toml(None, "x")
    assert cond.holds(TARGETS["hopper"], "1.0") and str(cond) == "always"


@pytest.mark.parametrize("data, match", [
    ({"target": ["gb100"]}, "unknown target 'gb100'"),
    ({"torch": ">>2"}, "bad torch specifier"),
    ({"arch": "12.0"}, "unknown condition keys"),
])
def test_condition_errors(data, match):
    with pytest.raises(RecipeError, match=match):
        Condition.from_toml(data, "where")


# ---- loading recipes -----------------------------------------------------------------------------------
def test_load_minimal_recipe(tree):
    write_recipe(tree, "pkg", recipe_toml(extra_version='gcc = ">=13"\nrequirements-files = ["r.txt"]\n'))
    r = load_recipe("pkg")
    v = r.version("1.0")
    assert (r.name, r.import_name, r.builder, r.jobs_style) == ("pkg", "pkg", "pip-wheel", "torch-ext")
    assert v.sdist.kind == "pypi" and v.sdist.sha256 == SHA and v.sdist.version == "1.0"
    assert v.gcc == SpecifierSet(">=13") and v.requirements_files == ("r.txt",)
    assert r.arch.archs_for(TARGETS["gb10"]) == (CudaArch(12, 1, "a"),)
    assert r.arch.value_for(TARGETS["blackwell"]) == "12.0f"
    # a target the recipe does not name (native on an sm_89 device) gets plain code for it
    assert r.arch.archs_for(Target("sm89", (ComputeCapability(8, 9),), "")) == (CudaArch(8, 9),)
    with pytest.raises(UsageError, match="no version '2.0'; it knows: 1.0"):
        r.version("2.0")


def test_split_compile_threads(tree):
    write_recipe(tree, "pkg", recipe_toml())
    assert load_recipe("pkg").split_compile == 0      # absent: never split
    write_recipe(tree, "pkg", recipe_toml(tail="[split-compile]\nthreads = 2\n"))
    assert load_recipe("pkg").split_compile == 2


@pytest.mark.parametrize("table, match", [
    ("threads = 1", "threads must be a whole number >= 2, got 1"),
    ("threads = true", "got True"),
    ('threads = "2"', "got '2'"),
    ("", "got None"),
    ("threads = 2\nunits = 3", r"unknown keys \['units'\]"),
])
def test_split_compile_errors(tree, table, match):
    write_recipe(tree, "pkg", recipe_toml(tail=f"[split-compile]\n{table}\n"))
    with pytest.raises(RecipeError, match=match):
        load_recipe("pkg")


def test_unknown_package_names_the_known_ones(tree):
    write_recipe(tree, "alpha", recipe_toml("alpha"))
    write_recipe(tree, "beta", recipe_toml("beta"))
    assert recipe_names() == ["alpha", "beta"]
    with pytest.raises(UsageError, match="unknown package 'gamma'; recipes: alpha, beta"):
        load_recipe("gamma")


@pytest.mark.parametrize("remove, key", [
    ('import-name = "pkg"\n', "import-name"),
    ('knob = "TORCH_CUDA_ARCH_LIST"\n', "knob"),
    ('version = "1.0"\n', "version"),
])
def test_missing_keys(tree, remove, key):
    text = recipe_toml()
    assert remove in text
    write_recipe(tree, "pkg", text.replace(remove, ""))
    with pytest.raises(RecipeError, match=f"missing key '{key}'"):
        load_recipe("pkg")


def test_missing_versions_table(tree):
    text = recipe_toml().split("[[versions]]")[0] + '[arch]\nknob = "X"\n'
    write_recipe(tree, "pkg", text)
    with pytest.raises(RecipeError, match="missing key 'versions'"):
        load_recipe("pkg")


def test_bad_toml_is_one_line(tree):
    write_recipe(tree, "pkg", "[package\nname=")
    with pytest.raises(RecipeError) as exc:
        load_recipe("pkg")
    assert "pkg.toml" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("resource, match", [
    (f'{{ name = "r", git = "https://github.com/o/r", commit = "{COMMIT[:12]}", sha256 = "{SHA}" }}',
     "needs a full 40-hex commit"),
    (f'{{ name = "r", git = "https://github.com/o/r", commit = "{COMMIT.upper()}", sha256 = "{SHA}" }}',
     "needs a full 40-hex commit"),
    (f'{{ name = "r", git = "https://github.com/o/r", commit = "{COMMIT}", sha256 = "abc" }}', "'r' has no sha256 pin"),
    (f'{{ name = "r", url = "https://x.invalid/r.tgz", sha256 = "{SHA}", optional = true }}', "optional ="),
    (f'{{ name = "r", url = "https://x.invalid/r.tgz", sha256 = "{SHA}", when = {{ archs = ["12.1q"] }} }}',
     "12.1q"),
    ('{ name = "r", url = "https://example.invalid/r.tar.gz", sha256 = "abc" }', "'r' has no sha256 pin"),
    (f'{{ name = "r", url = "https://example.invalid/r.tar.gz", sha256 = "{SHA.upper()}" }}', "no sha256 pin"),
    (f'{{ name = "r", sha256 = "{SHA}" }}', "needs one of pypi, git, url"),
    (f'{{ name = "r", url = "https://x.invalid/r.tgz", sha256 = "{SHA}", when = {{ target = ["gb1"] }} }}',
     "unknown target 'gb1'"),
])
def test_bad_resources(tree, resource, match):
    write_recipe(tree, "pkg", recipe_toml(extra_version=f"resources = [{resource}]\n"))
    with pytest.raises(RecipeError, match=match):
        load_recipe("pkg")


def test_git_resource_is_pinned_by_its_commit_alone(tree):
    res = f'{{ name = "r", git = "https://github.com/o/r", commit = "{COMMIT}" }}'
    write_recipe(tree, "pkg", recipe_toml(extra_version=f"resources = [{res}]\n"))
    (r,) = load_recipe("pkg").version("1.0").resources
    assert r.sha256 == "" and r.pinned and r.commit == COMMIT


def test_resource_may_say_unpinned_but_the_sdist_may_not(tree):
    res = ('{ name = "r", url = "https://x.invalid/r.tgz", sha256 = "unpinned: upstream pins a tag", '
           'optional = "the wheel lacks r" }')
    write_recipe(tree, "pkg", recipe_toml(extra_version=f"resources = [{res}]\n"))
    (r,) = load_recipe("pkg").version("1.0").resources
    assert r.sha256.startswith("unpinned") and r.role == "resource" and not r.pinned
    assert r.optional == "the wheel lacks r"
    write_recipe(tree, "pkg", recipe_toml(sdist='{ pypi = "pkg", sha256 = "unpinned: later" }'))
    with pytest.raises(RecipeError, match="sdist of 'pkg' must have a sha256 pin"):
        load_recipe("pkg")


def test_missing_sdist_sha256(tree):
    write_recipe(tree, "pkg", recipe_toml(sdist='{ pypi = "pkg" }'))
    with pytest.raises(RecipeError, match="no sha256 pin"):
        load_recipe("pkg")


def test_git_resource_fields(tree):
    res = (f'{{ name = "cutlass", git = "https://github.com/NVIDIA/cutlass", commit = "{COMMIT}", '
           f'sha256 = "{SHA}", submodules = true, env = "CUTLASS_DIR", defined-in = "CMakeLists.txt", '
           f'when = {{ target = ["gb10"] }} }}')
    write_recipe(tree, "pkg", recipe_toml(extra_version=f"resources = [{res}]\n"))
    v = load_recipe("pkg").version("1.0")
    (r,) = v.resources
    assert (r.kind, r.commit, r.submodules, r.env, r.defined_in) == ("git", COMMIT, True, "CUTLASS_DIR",
                                                                    "CMakeLists.txt")
    assert v.resources_for(TARGETS["gb10"], "2.11.0") == (r,)
    assert v.resources_for(TARGETS["blackwell"], "2.11.0") == ()


def test_patches_exist_and_carry_conditions(tree):
    pdir = tree / "patches" / "pkg" / "1.0"
    pdir.mkdir(parents=True)
    (pdir / "0001-a.patch").write_text(PATCH)
    (pdir / "0002-b.patch").write_text(PATCH)
    patches = """
      [[versions.patches]]
      file = "0001-a.patch"
      [[versions.patches]]
      file = "0002-b.patch"
      when = { torch = ">=2.14" }
    """
    write_recipe(tree, "pkg", recipe_toml(extra_version=patches))
    v = load_recipe("pkg").version("1.0")
    assert [p.file.name for p in v.patches] == ["0001-a.patch", "0002-b.patch"]
    assert [p.file.name for p in v.patches_for(TARGETS["gb10"], "2.11.0")] == ["0001-a.patch"]
    assert len(v.patches_for(TARGETS["gb10"], "2.14.1+cu130")) == 2


def test_missing_patch_file(tree):
    write_recipe(tree, "pkg", recipe_toml(extra_version='[[versions.patches]]\nfile = "0001-gone.patch"\n'))
    with pytest.raises(RecipeError, match=r"patch .*pkg/1.0/0001-gone.patch does not exist"):
        load_recipe("pkg")


def test_bad_version(tree):
    write_recipe(tree, "pkg", recipe_toml(version="one.two"))
    with pytest.raises(RecipeError, match="bad version 'one.two'"):
        load_recipe("pkg")


# ---- stacks --------------------------------------------------------------------------------------------
def test_stack_loading_and_default(tree):
    write_recipe(tree, "pkg", recipe_toml())
    write_stack(tree, "a", {"torch": "2.14.0", "pkg": "1.0"}, default=True)
    write_stack(tree, "b", {"torch": "2.11.0", "pkg": "1.0"})
    assert default_stack_name() == "a"
    s = load_stack()
    assert (s.name, s.torch, s.pins, s.default, s.cuda) == ("a", "2.14.0", {"pkg": "1.0"}, True, "13.0")
    assert load_stack("b").torch == "2.11.0"
    with pytest.raises(UsageError, match="unknown stack 'c'; stacks: a, b"):
        load_stack("c")


@pytest.mark.parametrize("defaults", [(), ("a", "b")])
def test_exactly_one_default_stack(tree, defaults):
    for n in ("a", "b"):
        write_stack(tree, n, {"torch": "2.14.0"}, default=n in defaults)
    with pytest.raises(RecipeError, match="exactly one stack"):
        load_stack()


def test_stack_must_pin_torch(tree):
    write_stack(tree, "a", {"pkg": "1.0"}, default=True)
    with pytest.raises(RecipeError, match="must pin torch"):
        load_stack("a")


def test_broken_stack_toml_is_a_recipe_error(tree):
    (tree / "recipes" / "stacks" / "a.toml").write_text("[pins\n")
    with pytest.raises(RecipeError, match="a.toml"):
        load_stack("a")


def test_dependency_order(tree):
    write_recipe(tree, "app", recipe_toml("app", depends=("lib", "mid")))
    write_recipe(tree, "mid", recipe_toml("mid", depends=("lib",)))
    write_recipe(tree, "lib", recipe_toml("lib", depends=("not-in-stack",)))
    write_stack(tree, "s", {"torch": "2.14.0", "app": "1.0", "mid": "1.0", "lib": "1.0"}, default=True)
    assert [r.name for r in load_stack("s").recipes()] == ["lib", "mid", "app"]


def test_dependency_cycle(tree):
    write_recipe(tree, "a", recipe_toml("a", depends=("b",)))
    write_recipe(tree, "b", recipe_toml("b", depends=("a",)))
    write_stack(tree, "s", {"torch": "2.14.0", "a": "1.0", "b": "1.0"}, default=True)
    with pytest.raises(RecipeError, match="cycle: a -> b -> a"):
        load_stack("s").recipes()


# ---- the stack's pins against the sdist's own requirements ------------------------------------------------
def sdist_tree(where: Path, requires: list[str], files: dict[str, str] | None = None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    lines = ["Metadata-Version: 2.1", "Name: app", "Version: 1.0"] + [f"Requires-Dist: {r}" for r in requires]
    (where / "PKG-INFO").write_text("\n".join(lines) + "\n")
    for rel, text in (files or {}).items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_text(text)
    return where


def test_torch_disagreement_is_one_sentence_naming_both(tree):
    write_recipe(tree, "app", recipe_toml("app"))
    write_stack(tree, "s", {"torch": "2.14.0", "app": "1.0"}, default=True)
    src = sdist_tree(tree / "src", ["torch==2.11.0", "numpy"])
    (msg,) = stack_disagreements(load_stack("s"), load_recipe("app"), src)
    assert "torch==2.11.0" in msg and "2.14.0" in msg and msg.startswith("app 1.0 requires")


def test_agreeing_pins_and_markers(tree):
    write_recipe(tree, "app", recipe_toml("app"))
    write_stack(tree, "s", {"torch": "2.14.0", "app": "1.0"}, default=True)
    src = sdist_tree(tree / "src", [
        "torch==2.14.0",
        'torch==2.11.0; extra == "old"',               # only with an extra: not required
        'torch==2.11.0; python_version < "3"',           # never on this Python
        "torch",                                         # no specifier
        "not a requirement ((",                          # unreadable lines are skipped
    ])
    assert stack_disagreements(load_stack("s"), load_recipe("app"), src) == []


def test_dependency_pins_by_distribution_name(tree):
    write_recipe(tree, "lib", recipe_toml("lib", dist_name="lib-python"))
    write_recipe(tree, "app", recipe_toml("app", depends=("lib",)))
    write_stack(tree, "s", {"torch": "2.14.0", "app": "1.0", "lib": "1.0"}, default=True)
    src = sdist_tree(tree / "src", ["Lib_Python==0.9", "torch>=2.14"])
    (msg,) = stack_disagreements(load_stack("s"), load_recipe("app"), src)
    assert "Lib_Python==0.9" in msg and "pins 1.0" in msg


def test_requirements_files_of_the_version_and_pyproject(tree):
    extra = 'requirements-files = ["requirements/cuda.txt", "pyproject.toml"]\n'
    write_recipe(tree, "app", recipe_toml("app", extra_version=extra))
    write_stack(tree, "s", {"torch": "2.14.0", "app": "1.0"}, default=True)
    src = sdist_tree(tree / "src", [], {
        "requirements/cuda.txt": "# comment\n-r common.txt\ntorch == 2.13.0  # pinned\n",
        "pyproject.toml": '[build-system]\nrequires = ["setuptools", "torch == 2.12.0"]\n',
    })
    reqs = sdist_requirements(src, load_recipe("app"), "1.0")
    assert reqs == ["torch == 2.13.0", "setuptools", "torch == 2.12.0"]
    msgs = stack_disagreements(load_stack("s"), load_recipe("app"), src)
    assert len(msgs) == 2 and "2.13.0" in msgs[0] and "2.12.0" in msgs[1]


def test_expect_requirements_files_still_read(tree):
    write_recipe(tree, "app", recipe_toml("app", tail='[expect]\nrequirements-files = ["req.txt"]\n'))
    src = sdist_tree(tree / "src", ["numpy"], {"req.txt": "torch==2.11.0\n"})
    assert sdist_requirements(src, load_recipe("app")) == ["numpy", "torch==2.11.0"]


def test_git_submodules_as_a_list_of_paths(tree):
    res = (f'{{ name = "fa", git = "https://github.com/o/fa", commit = "{COMMIT}", sha256 = "{SHA}", '
           f'submodules = ["csrc/cutlass"] }}')
    write_recipe(tree, "pkg", recipe_toml(extra_version=f"resources = [{res}]\n"))
    (r,) = load_recipe("pkg").version("1.0").resources
    assert r.submodules is True and r.submodule_paths == ("csrc/cutlass",)


@pytest.mark.parametrize("archs, target, holds", [
    (["9.0a", "10.0f"], "hopper", True),       # FlashMLA: 9.0a serves exactly 9.0
    (["9.0a", "10.0f"], "gb10", False),
    (["10.0f"], "blackwell", False),           # MSA: no 12.x target
    (["12.0f"], "gb10", True),                 # a family entry serves 12.1a
    (["12.0f"], "sm120", True),
])
def test_condition_archs_follows_the_loose_intersection(archs, target, holds):
    from blackwheel.core.targets import parse_arch_list
    cond = Condition.from_toml({"archs": archs}, "t")
    target_archs = {"hopper": "9.0a", "gb10": "12.1a", "blackwell": "12.0f;12.1a", "sm120": "12.0f"}[target]
    assert cond.holds(TARGETS[target], "2.11.0", parse_arch_list(target_archs)) is holds
    assert "an arch served by" in str(cond)


def test_links_torch(tree):
    write_recipe(tree, "pkg", recipe_toml())
    assert load_recipe("pkg").links_torch is False       # absent: the wheel serves any torch
    write_recipe(tree, "pkg", recipe_toml().replace('depends = []', 'depends = []\nlinks-torch = true'))
    assert load_recipe("pkg").links_torch is True
    write_recipe(tree, "pkg", recipe_toml().replace('depends = []', 'depends = []\nlinks-torch = "yes"'))
    with pytest.raises(RecipeError, match=r"\[package\] links-torch must be true or false, got 'yes'"):
        load_recipe("pkg")

"""Recipe variants (``[[versions.variants]]``, ``--variant NAME=on|off``): parsed and refused at load,
chosen per request, and part of the build key, the wheel's version and the build environment."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from blackwheel.builders import BuildRequest
from blackwheel.cli.build import variant_choices as _variant_choices
from blackwheel.pipeline.build import _required_cubins, build_inputs, build_key, left_out_libraries
from blackwheel.core.errors import RecipeError, UsageError
from blackwheel.core.recipe import load_recipe, load_stack, parse_variant_choices
from blackwheel.core.targets import resolve_target
from blackwheel.release.wheelhouse import local_version

from tests.core.test_recipe import recipe_toml, tree, write_recipe, write_stack  # noqa: F401  (tree: a fixture)

VARIANT = """
  [[versions.variants]]
  name = "fa3"
  default = true
  description = "FlashAttention 3"
  env-off = { SKIP_FA3 = "1" }
"""


class FakeToolchain:
    def identity(self) -> dict:
        return {"nvcc": "13.0.88"}


def request(tree: Path, choices=()) -> BuildRequest:
    write_recipe(tree, "pkg", recipe_toml(extra_version=VARIANT))
    write_stack(tree, "s", {"torch": "2.11.0", "pkg": "1.0"}, default=True)
    return BuildRequest(recipe=load_recipe("pkg"), stack=load_stack("s"), target=resolve_target("gb10"),
                        wheelhouse=tree / "wh", workdir=tree / "work", variant_choices=tuple(choices))


def test_a_variant_off_changes_key_version_and_environment(tree):
    default, off = request(tree), request(tree, [("fa3", False)])
    assert default.variants == {"fa3": True} and off.variants == {"fa3": False}
    assert default.variant_tags == [] and off.variant_tags == ["nofa3"]
    assert default.variant_env() == {} and off.variant_env() == {"SKIP_FA3": "1"}
    keys = {build_key(build_inputs(r, FakeToolchain())) for r in (default, off, request(tree, [("fa3", True)]))}
    assert len(keys) == 2     # asking for the default is the default
    assert local_version("13.0", "sm121", off.variant_tags) == "cu130.sm121.nofa3"
    assert local_version("13.0", "sm121") == "cu130.sm121"


def test_unknown_or_misspelt_variants_are_one_line_errors(tree):
    with pytest.raises(UsageError, match="no variant 'fa4' .variants: fa3."):
        _ = request(tree, [("fa4", False)]).variants
    for bad in ("fa3", "fa3=maybe"):
        with pytest.raises(UsageError, match="write NAME=on or NAME=off"):
            parse_variant_choices([bad])
    assert parse_variant_choices(["fa3=off", "x=ON"]) == {"fa3": False, "x": True}


def test_build_all_binds_a_variant_to_the_packages_that_have_it(tree):
    write_recipe(tree, "pkg", recipe_toml(extra_version=VARIANT))
    write_recipe(tree, "other", recipe_toml(name="other"))
    write_stack(tree, "s", {"torch": "2.11.0", "pkg": "1.0", "other": "1.0"}, default=True)
    stack = load_stack("s")
    args = argparse.Namespace(variant=["fa3=off"])        # build-all: no `package`
    assert _variant_choices(args, load_recipe("pkg"), stack) == (("fa3", False),)
    assert _variant_choices(args, load_recipe("other"), stack) == ()
    with pytest.raises(UsageError, match="no package of stack s has a variant 'nope'"):
        _variant_choices(argparse.Namespace(variant=["nope=on"]), load_recipe("other"), stack)


@pytest.mark.parametrize("body, message", [
    ('name = "Fa3"\ndefault = true\nenv-off = { A = "1" }', "lowercase name"),
    ('name = "fa3"\ndefault = "yes"\nenv-off = { A = "1" }', "default = true or false"),
    ('name = "fa3"\ndefault = true', "changes nothing"),
    ('name = "fa3"\ndefault = true\nenv-off = { A = "1" }\ncolour = "red"', "unknown keys"),
])
def test_bad_variants_are_refused_at_load(tree, body, message):
    write_recipe(tree, "pkg", recipe_toml(extra_version="[[versions.variants]]\n" + body + "\n"))
    with pytest.raises(RecipeError, match=message):
        load_recipe("pkg")


def test_the_vllm_recipe_declares_fa3_for_patch_0004():
    rv = load_recipe("vllm").version("0.25.1")
    (fa3,) = rv.variants
    assert fa3.name == "fa3" and fa3.default is True and fa3.env_for(False) == {"VLLM_SKIP_FA3": "1"}
    patch = next(p.file for p in rv.patches if p.file.name.startswith("0004-"))
    assert 'os.environ.get("VLLM_SKIP_FA3") == "1"' in patch.read_text()


def test_what_a_variant_or_a_left_out_resource_does_not_build_is_not_expected():
    """A hopper build with fa3=off and without FlashMLA (its pin not to be had) makes neither
    _vllm_fa3_C nor _flashmla_C: verify must not ask for their cubins, and says so."""
    vllm = load_recipe("vllm")
    req = BuildRequest(recipe=vllm, stack=load_stack("cu130-torch2.11"), target=resolve_target("hopper"),
                       wheelhouse=Path("wh"), workdir=Path("work"), variant_choices=(("fa3", False),))
    left_out = left_out_libraries(req, absent=["flashmla"])
    assert left_out == {"vllm/vllm_flash_attn/_vllm_fa3_C*.so": "variant fa3=off",
                        "vllm/_flashmla_C*.so": "optional flashmla left out"}
    required = _required_cubins(vllm, req.target)
    assert set(left_out) <= set(required)          # both are expected of a full hopper build
    assert left_out_libraries(BuildRequest(recipe=vllm, stack=req.stack, target=req.target, wheelhouse=Path("wh"),
                                           workdir=Path("work")), absent=[]) == {}


def test_a_variant_libraries_entry_must_be_a_list_of_globs(tree):
    body = VARIANT + '  libraries = "x.so"\n'
    write_recipe(tree, "pkg", recipe_toml(extra_version=body))
    with pytest.raises(RecipeError, match=r"libraries = \["):
        load_recipe("pkg")

"""builders/: the table of builders and the interface the pipeline calls."""

from __future__ import annotations

import dataclasses

import pytest

from blackwheel.builders import BUILDERS, Builder, builder_for
from blackwheel.builders.flashinfer_aot import FlashInferAot
from blackwheel.builders.pip_wheel import PipWheel
from blackwheel.builders.vllm import Vllm
from blackwheel.core.errors import RecipeError
from blackwheel.core.recipe import load_recipe, recipe_names


def test_the_three_builders():
    assert sorted(BUILDERS) == ["flashinfer-aot", "pip-wheel", "vllm"]
    for name, builder in BUILDERS.items():
        assert builder.name == name
        for method in ("key", "environment", "plan", "build"):
            assert callable(getattr(builder, method)), f"{name} lacks {method} of {Builder.__name__}"


def test_each_recipe_gets_its_builder():
    got = {name: type(builder_for(load_recipe(name))) for name in recipe_names()}
    assert got == {"flash-attn": PipWheel, "flashinfer": FlashInferAot, "vllm": Vllm}


def test_an_unknown_builder_is_a_recipe_error():
    recipe = dataclasses.replace(load_recipe("flash-attn"), builder="no-such-builder")
    with pytest.raises(RecipeError, match="unknown builder 'no-such-builder'"):
        builder_for(recipe)

"""builders: how a package's own build runs, behind one interface (``base.Builder``).

``BUILDERS`` is the table a recipe's ``[package] builder`` names; a new builder is a module here
and one line in it (docs/ARCHITECTURE.md shows the smallest).
"""

from __future__ import annotations

from ..core.errors import RecipeError
from ..core.recipe import Recipe
from .base import Builder, BuildRequest, Built, Prepared
from .flashinfer_aot import FlashInferAot
from .pip_wheel import PipWheel
from .vllm import Vllm

BUILDERS: dict[str, Builder] = {b.name: b for b in (PipWheel(), FlashInferAot(), Vllm())}


def builder_for(recipe: Recipe) -> Builder:
    """The builder a recipe names (``[package] builder``)."""
    if recipe.builder not in BUILDERS:
        raise RecipeError(f"{recipe.path}: unknown builder {recipe.builder!r}; builders: {', '.join(BUILDERS)}")
    return BUILDERS[recipe.builder]


__all__ = ["BUILDERS", "Builder", "BuildRequest", "Built", "Prepared", "builder_for"]

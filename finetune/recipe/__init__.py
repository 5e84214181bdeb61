"""Typed training recipes: nested dataclasses loaded from YAML, strictly checked, with provenance.

A recipe is a YAML file in ``recipes/`` (or any path). It may ``extends:`` another recipe and
is then deep-merged on top of it; ``key.path=value`` overrides from the command line are applied
last. Every problem found is reported at once in a single :class:`RecipeError`, each with its
dotted path and the file or override that set it, and the loaded :class:`Recipe` remembers, for
each setting, whether it is a default, came from a recipe file or from an override (see
:func:`recipe_provenance` and :func:`save_resolved`).

The package, each module importing only those above it in this list:

- ``fields``: the dataclasses; each field's default, help, choices and bounds (layer 4 of
  DESIGN.md, over the families' role names and the DeepSpeed presets);
- ``check``: filling a Recipe from merged settings and checking it (problems attributed to layers);
- ``stages``: a recipe's ``stages:``, each filled and checked as a recipe of its own;
- ``load``: YAML files, ``extends``, overrides, provenance, resolved files;
- ``run``: a trained run's recipe for eval and export, and the recipe as an export shares it.

This module only gathers the public names; none of them imports it, so the package has no cycle.
"""

from __future__ import annotations

from finetune.recipe.fields import (
    CHOICES,
    DataConfig,
    DataSource,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    OutputConfig,
    Recipe,
    RecipeError,
    RoleConfig,
    RolesConfig,
    TrainConfig,
    field_help,
    role_names,
    shards_weights,
)
from finetune.recipe.load import (
    list_recipes,
    load_recipe,
    load_resolved,
    recipe_provenance,
    recipe_to_dict,
    save_resolved,
)

__all__ = [
    "CHOICES",
    "RecipeError",
    "Recipe",
    "ModelConfig",
    "RoleConfig",
    "RolesConfig",
    "DataConfig",
    "DataSource",
    "TrainConfig",
    "EvalConfig",
    "ExportConfig",
    "OutputConfig",
    "role_names",
    "shards_weights",
    "load_recipe",
    "load_resolved",
    "save_resolved",
    "recipe_to_dict",
    "recipe_provenance",
    "list_recipes",
    "field_help",
]

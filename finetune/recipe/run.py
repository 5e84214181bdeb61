"""A trained run's recipe: what `eval` and `export` may change on it (:func:`load_run`), and the
recipe as an export shares it, without the data's paths (:func:`shareable_recipe`).
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune.hub import is_hub_id
from finetune.recipe.fields import Recipe, RecipeError, leaf_paths
from finetune.recipe.load import (
    DEFAULT_SOURCE,
    OVERRIDE_SOURCE,
    is_resolved,
    load_recipe,
    load_resolved,
    parse_yaml,
    recipe_provenance,
    recipe_to_dict,
    resolve_layers,
)

# ----------------------------------------------------------------------------------------------
# The recipe as an export shares it
# ----------------------------------------------------------------------------------------------


def file_name(path: str) -> str:
    """A data location as shared files name it: its last part (file or folder name), never the
    folders above it ('' stays '')."""
    parts = re.split(r"[\\/]+", str(path or "").rstrip("\\/"))
    return parts[-1] if parts else ""


def model_name(path: str) -> str:
    """model.path as shared files name it: `tiny:<family>` and a hub id (org/name) as they are, a
    local folder by its folder name."""
    text = str(path or "")
    if text.startswith("tiny:") or (is_hub_id(text) and not Path(text).exists()):
        return text
    return file_name(text)


def _scrub(body: dict) -> None:
    """Reduce one recipe (or stage) mapping to what may be shared, in place: paths to names, no
    output folder, no system prompt text."""
    model = body.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str):
        model["path"] = model_name(model["path"])
    data = body.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("train"), str):
            data["train"] = file_name(data["train"])
        elif isinstance(data.get("train"), list):
            for src in data["train"]:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    src["path"] = file_name(src["path"])
        if isinstance(data.get("eval"), str):
            data["eval"] = file_name(data["eval"])
        if data.get("system_prompt"):
            del data["system_prompt"]
    ev = body.get("eval")
    if isinstance(ev, dict) and isinstance(ev.get("general"), str):
        ev["general"] = file_name(ev["general"])
    train = body.get("train")
    if isinstance(train, dict):
        if isinstance(train.get("resume"), str) and train["resume"] not in ("auto", "never"):
            train["resume"] = file_name(train["resume"])
        if isinstance(train.get("deepspeed"), str) and re.search(r"[\\/]|\.json$", train["deepspeed"]):
            train["deepspeed"] = file_name(train["deepspeed"])
    out = body.get("output")
    if isinstance(out, dict):
        out.pop("dir", None)
        if not out:
            del body["output"]


def shareable_recipe(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe as an export carries it when `export.include_data_details` is false:
    data files, eval.general and a local model.path named by their last part, no output folder,
    no system prompt text (the run folder's recipe.yaml keeps all of it)."""
    body = recipe_to_dict(recipe)
    if recipe.stages:
        body["stages"] = copy.deepcopy([stage for _, stage, _ in recipe.stages])
    _scrub(body)
    for stage in body.get("stages", []):
        if isinstance(stage, dict):
            _scrub(stage)
    return body


def save_shareable(recipe: Recipe, path: Path) -> None:
    """Write :func:`shareable_recipe` (with each setting's origin) as YAML, saying what was left out."""
    left_out = "data files by name only, no output folder"
    if recipe.data.system_prompt:
        left_out += ", the system prompt's text left out (one was used)"
    sources = {k: (f"recipe:{file_name(v[7:])}" if v.startswith("recipe:") else v)
               for k, v in recipe_provenance(recipe).items()}
    body = yaml.safe_dump({"recipe": shareable_recipe(recipe), "sources": sources}, sort_keys=False,
                          allow_unicode=True, default_flow_style=False)
    header = (f"# Recipe '{recipe.name}' as shared with this export: {left_out}.\n"
              "# The run folder's recipe.yaml holds the full resolved recipe (export.include_data_details: true "
              "copies that one here).\n")
    Path(path).write_text(header + body, encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# An existing run: evaluation and export settings change, what was trained does not
# ----------------------------------------------------------------------------------------------

#: what `eval` and `export` may change on a trained run: how it is evaluated and exported, on
#: which held-out data, and how bad samples of that data are handled. Everything else (model,
#: roles, data.train, the prompt, the pixels, train.*, stages) made the adapter, and stays the
#: run's own (its recipe.yaml).
RUN_SETTINGS: tuple[str, ...] = ("description", "data.eval", "data.on_error", "data.allow_outside_paths", "eval.*",
                                 "export.*")
#: what locates a run folder rather than describing the run
_LOCATORS = ("name", "output.dir")


def run_may_change(path: str) -> bool:
    """True for a dotted setting in :data:`RUN_SETTINGS` (``eval.*`` covers ``eval.max_samples``)."""
    return any(path == p or (p.endswith(".*") and path.startswith(p[:-1])) for p in RUN_SETTINGS)


class RunRecipe(typing.NamedTuple):
    """What :func:`load_run` returns: the recipe to evaluate or export with, the run folder, and
    one line per setting the recipe now gives otherwise than the run was trained with (the run's
    value is kept)."""

    recipe: Recipe
    run_dir: Path
    notes: list[str]


def run_folder_of(target: str | Path) -> Path | None:
    """The run folder ``target`` names: a folder with a recipe.yaml, or a run's own recipe.yaml
    (or stages.yaml) inside one; None for anything else (a recipe name or file)."""
    p = Path(target)
    if p.is_dir():
        return p if (p / "recipe.yaml").is_file() else None
    if p.name in ("recipe.yaml", "stages.yaml") and p.is_file() and (p.parent / "recipe.yaml").is_file():
        try:
            return p.parent if is_resolved(parse_yaml(p.read_text(encoding="utf-8"))) else None
        except (OSError, yaml.YAMLError):
            return None
    return None


def trained_recipe_file(run_dir: Path) -> Path:
    """The file of the recipe a run folder was trained with: a staged run's stages.yaml (every
    stage), else its recipe.yaml."""
    staged = Path(run_dir) / "stages.yaml"
    return staged if staged.is_file() else Path(run_dir) / "recipe.yaml"


def _settings(recipe: Recipe) -> dict[str, Any]:
    """Every leaf setting by dotted path, and `stages` as written."""
    body = recipe_to_dict(recipe)
    flat: dict[str, Any] = {}
    for path in leaf_paths():
        value: Any = body
        for part in path.split("."):
            value = value[part]
        flat[path] = value
    flat["stages"] = [stage for _, stage, _ in recipe.stages]
    return flat


def _set(body: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        body = body.setdefault(part, {})
    body[leaf] = copy.deepcopy(value)


def load_run(target: str | Path, overrides: Sequence[str] = (), recipes_dir: Path | None = None) -> RunRecipe:
    """The recipe of an existing run for `eval` and `export`, with ``overrides`` applied.

    ``target`` is a run folder (or its recipe.yaml): its recipe.yaml with the overrides on top.
    Or a recipe (name or file) with the overrides, which locates the run folder (``output.dir``,
    else runs/<name>): when that folder holds a trained run, the run's recipe with the recipe's
    :data:`RUN_SETTINGS`; a setting of what was trained that the recipe file now gives otherwise
    keeps the run's value, with a note. An override that changes what was trained is refused,
    every one named, in one :class:`RecipeError`. Without a run folder: the recipe as it is.
    """
    folder = run_folder_of(target)
    if folder is not None:
        path = trained_recipe_file(folder)
        recipe = load_recipe(path, overrides, recipes_dir)
        saved = load_resolved(path)
        given, had = _settings(recipe), _settings(saved)
        changed = [k for k in given if given[k] != had[k]]
        refused = [k for k in changed if not run_may_change(k)]
        if refused:
            raise _refuse(folder, refused, had, given, recipe_provenance(recipe))
        if recipe.stages and Path(recipe.run_dir).resolve() != folder.resolve():
            # a staged run moved since (or a relative output.dir): its stages are found from output.dir; an
            # unstaged one keeps the recipe it was trained with (its exports carry it) and is given run_dir
            recipe.output.dir = str(folder)
        return RunRecipe(recipe, folder, [])

    recipe = load_recipe(target, overrides, recipes_dir)
    run_dir = recipe.run_dir
    if not (run_dir / "recipe.yaml").is_file():
        return RunRecipe(recipe, run_dir, [])
    path = trained_recipe_file(run_dir)
    saved = load_resolved(path)
    given, had = _settings(recipe), _settings(saved)
    sources = recipe_provenance(recipe)
    changed = [k for k in given if given[k] != had[k] and k not in _LOCATORS]
    refused = [k for k in changed if not run_may_change(k) and sources.get(k, OVERRIDE_SOURCE) == OVERRIDE_SOURCE]
    if refused:
        raise _refuse(run_dir, refused, had, given, sources)
    body = recipe_to_dict(saved)
    if saved.stages:
        body["stages"] = had["stages"]
    notes, taken = [], []
    for k in changed:
        if run_may_change(k):
            _set(body, k, given[k])
            taken.append(k)
        else:
            notes.append(f"{run_dir} was trained with {k}={had[k]!r}; the recipe now gives {given[k]!r} "
                         f"({sources.get(k, DEFAULT_SOURCE)}): the run keeps what it was trained with")
    if saved.stages and Path(saved.run_dir).resolve() != Path(run_dir).resolve():
        body["output"]["dir"] = str(run_dir)
    out = resolve_layers([(path.name, body)], saved.name)
    out._sources = {**recipe_provenance(saved), **{k: sources[k] for k in taken if k in sources}}
    return RunRecipe(out, run_dir, notes)


def _refuse(run_dir: Path, keys: list[str], had: dict, given: dict, sources: dict) -> RecipeError:
    lines = []
    for k in keys:
        if k in _LOCATORS:
            lines.append(f"{k}: {given[k]!r} names another run than {run_dir}; give that run folder, or the recipe")
        else:
            lines.append(f"{k}: the run was trained with {had[k]!r}; this command gives {given[k]!r} "
                         f"({sources.get(k, OVERRIDE_SOURCE)})")
    return RecipeError(
        f"{run_dir} is a trained run: eval and export change only {', '.join(RUN_SETTINGS)} on it, and this command "
        f"changes what was trained:\n" + "\n".join(f"  {ln}" for ln in lines) +
        "\nFix: drop these settings (the run's recipe.yaml keeps what it was trained with), or train a new run with "
        "them (another output.dir)", lines)

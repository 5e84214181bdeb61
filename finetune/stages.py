"""Staged recipes: stages trained in order, each from the weights the one before produced.

A recipe with `stages:` (see finetune.recipe.stages.STAGE_KEYS) trains each stage as a run of its own:

    runs/<name>/stages/01-<first>/   checkpoints, adapter, metrics, recipe.yaml, merged/
    runs/<name>/stages/02-<second>/  ...
    runs/<name>/                     the last stage's run: adapter, checkpoints, recipe.yaml
    runs/<name>/stages.yaml          the staged recipe, every stage's settings as written

A stage before the last ends with its merged, verified export (finetune.export.export_merged:
written in the base's layout, reloaded and compared); the next stage loads that folder as its
model. The last stage trains in the run folder itself, so evaluation and export see the final
model exactly as they see a one-stage run, and evaluation scores the original base beside it.

A stage whose merged export is complete and whose recipe is the one that made it is not run
again; a stage that was killed resumes from its last checkpoint like any run (train.resume
auto). A finished stage whose settings changed since stops the run with what to do, rather
than training later stages on weights the recipe no longer describes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from finetune.errors import ConfigError
from finetune.models import family_of
from finetune.recipe import load_resolved, recipe_to_dict, save_resolved
from finetune.runfolder import lock_run
from finetune.runtime import is_main_process

__all__ = ["stage_dir", "stage_recipes", "final_recipe", "begin", "done", "original_base"]


def stage_dir(run_dir: Path, i: int, name: str, n: int) -> Path:
    """The folder stage i (0-based) of n trains in: its own under stages/, the last one run_dir."""
    return Path(run_dir) if i == n - 1 else Path(run_dir) / "stages" / f"{i + 1:02d}-{name}"


def stage_recipes(recipe) -> list[tuple[str, Path, object]]:
    """(name, folder, recipe) per stage: each stage's recipe trains in its folder and loads the
    previous stage's merged export as its model (the family is the original model's)."""
    n = len(recipe.stages)
    family = family_of(recipe).name
    out = []
    for i, (name, _, rec) in enumerate(recipe.stages):
        rec = copy.deepcopy(rec)
        rec.name = recipe.name
        folder = stage_dir(recipe.run_dir, i, name, n)
        rec.output.dir = str(folder)
        if i > 0:
            rec.model.path = str(out[-1][1] / "merged")
            rec.model.family = family
        out.append((name, folder, rec))
    return out


def final_recipe(recipe):
    """The recipe that made the run folder's model: the last stage's, or the recipe itself."""
    return stage_recipes(recipe)[-1][2] if recipe.stages else recipe


def original_base(recipe):
    """For a staged run, the first stage's recipe (its model is the original base); else None."""
    return stage_recipes(recipe)[0][2] if recipe.stages else None


def done(folder: Path, rec) -> bool:
    """The stage's merged export is complete and was made by this stage recipe (a finished stage
    whose settings changed since stops the run: ConfigError)."""
    manifest = folder / "merged" / "export_manifest.json"
    if not manifest.exists():
        return False
    try:
        passed = json.loads(manifest.read_text())["verify"]["passed"]
        ran = load_resolved(folder / "recipe.yaml")
    except (OSError, ValueError, KeyError):
        return False
    if not passed:
        return False
    if recipe_to_dict(ran) != recipe_to_dict(rec):
        raise ConfigError(f"stage folder {folder} was trained with other settings than the recipe's stage now "
                          f"has (compare {folder / 'recipe.yaml'}); delete that folder (and the later stages') to "
                          "train it again, or restore the settings")
    return True


def begin(recipe) -> list[tuple[str, Path, object, bool]]:
    """Start a staged run: the run folder locked first (a run refused here writes nothing, not even
    stages.yaml), then stages.yaml written; returns (name, folder, recipe, done before) per stage, for
    the CLI to train in order (finetune.cli.run_stages)."""
    run_dir = Path(recipe.run_dir)
    stages = stage_recipes(recipe)
    if is_main_process():
        lock_run(run_dir)
        save_resolved(recipe, run_dir / "stages.yaml")
    last = len(stages) - 1
    return [(name, folder, rec, i < last and done(folder, rec)) for i, (name, folder, rec) in enumerate(stages)]

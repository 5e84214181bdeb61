"""A recipe's `stages:`: each stage sets only its name, roles, data and train; the rest is the
recipe's. Each stage is filled and checked as a recipe of its own, its problems reported under
`stages[i]` (finetune/stages.py trains them in order).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from finetune.families.base import ROLE_NAMES
from finetune.recipe.check import Problems, check_recipe, deep_merge, describe, fill, unknown_key_message
from finetune.recipe.fields import Recipe

STAGE_KEYS = ("name", "roles", "data", "train")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def stage_settings(merged: dict, stage: dict) -> dict:
    """A stage's full settings: the recipe's, with the stage's data and train merged over them and
    its roles instead of the recipe's (a role the stage does not name is frozen in it)."""
    out = copy.deepcopy(merged)
    if "roles" in stage:
        out["roles"] = {r: {"mode": "frozen"} for r in ROLE_NAMES}
        deep_merge(out["roles"], stage["roles"] or {})
    for key in ("data", "train"):
        if key in stage:
            out.setdefault(key, {})
            deep_merge(out[key], stage[key] or {})
    return out


def build_stages(stages: Any, merged: dict, problems: Problems) -> list:
    """`stages:` checked and resolved: (name, settings as written, recipe) per stage (a problem's
    path `stages[i]...` names the layer that set `stages`)."""
    if not isinstance(stages, list) or not stages:
        problems.add("stages", f"must be a non-empty list of stages ({{name: ..., roles: ..., data: ..., train: ...}}), "
                               f"got {describe(stages)}")
        return []
    out, names = [], []
    for i, stage in enumerate(stages):
        p = f"stages[{i}]"
        if not isinstance(stage, dict):
            problems.add(p, f"must be a mapping with name and any of roles, data, train; got {describe(stage)}")
            continue
        bad = [k for k in stage if k not in STAGE_KEYS]
        for k in bad:
            problems.add(f"{p}.{k}", f"a stage sets only {', '.join(STAGE_KEYS)}" + (
                "; the model, eval, export and output settings are the recipe's, for every stage"
                if k in ("model", "eval", "export", "output") else f" ({unknown_key_message(str(k), STAGE_KEYS)})"))
        name = stage.get("name")
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            problems.add(f"{p}.name", "needs a name of letters, digits, '-' and '_' (it names the stage's folder), "
                                      f"got {describe(name)}")
            continue
        if name in names:
            problems.add(f"{p}.name", f"two stages are named {name!r}; give each its own name")
            continue
        names.append(name)
        stage_problems = Problems(problems.layers, problems.fallback)
        rec = Recipe()
        fill(rec, stage_settings(merged, {k: v for k, v in stage.items() if k not in bad}), "", stage_problems)
        check_recipe(rec, stage_problems)
        for source, path, message in stage_problems.items:
            top = path.split(".")[0].split("[")[0]
            if top in stage:  # what the recipe itself sets is reported once, above
                problems.add(f"{p}.{path}", message, source)
        out.append((name, copy.deepcopy(stage), rec))
    return out


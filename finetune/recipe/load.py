"""Loading recipes: YAML files with `extends:`, `key.path=value` overrides, and where each value came
from.

A recipe is a YAML file in ``recipes/`` (or any path). It may ``extends:`` another recipe and is
then deep-merged on top of it; overrides are applied last. Each file and the overrides are one
layer, so every problem names the layer that set the value, and the loaded :class:`Recipe`
remembers, for each setting, whether it is a default, came from a recipe file or from an override
(:func:`recipe_provenance`, :func:`save_resolved`). A file written by :func:`save_resolved` (a
run's recipe.yaml) is a recipe too.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import fsutil
from finetune.recipe.check import (
    NO,
    Layer,
    Problems,
    check_recipe,
    coerce,
    deep_merge,
    describe,
    fill,
    format_error,
    layer_index,
)
from finetune.recipe.fields import Recipe, RecipeError, leaf_paths, leaf_type, public_fields
from finetune.recipe.stages import build_stages

DEFAULT_SOURCE = "default"
OVERRIDE_SOURCE = "override"

# ----------------------------------------------------------------------------------------------
# YAML reading
# ----------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise silently drop."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: let the base class produce its own error
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """YAML text as data, duplicate keys refused."""
    return yaml.load(text, Loader=_StrictLoader)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """A YAML error on one line."""
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------------------------
# Layers to a checked Recipe
# ----------------------------------------------------------------------------------------------


def resolve_layers(layers: Sequence[Layer], name: str, extra: Sequence[tuple[str, str, str]] = ()) -> Recipe:
    """Merge the layers, build and check the recipe; raise one RecipeError listing every problem."""
    merged: dict = {}
    for _, data in layers:
        deep_merge(merged, data)
    files = [label for label, _ in layers if label != OVERRIDE_SOURCE]
    problems = Problems(layers, fallback=files[-1] if files else OVERRIDE_SOURCE)
    for source, path, message in extra:
        problems.add(path, message, source)
    stages = merged.pop("stages", None)
    recipe = Recipe()
    fill(recipe, merged, "", problems)
    check_recipe(recipe, problems, staged=stages is not None)
    if stages is not None:
        recipe._stages = build_stages(stages, merged, problems)
    if problems.items:
        raise format_error(name, problems.lines())
    sources = {}
    for path in leaf_paths():
        i = layer_index(layers, path)
        if i < 0:
            sources[path] = DEFAULT_SOURCE
        elif layers[i][0] == OVERRIDE_SOURCE:
            sources[path] = OVERRIDE_SOURCE
        else:
            sources[path] = f"recipe:{layers[i][0]}"
    recipe._sources = sources
    return recipe


# ----------------------------------------------------------------------------------------------
# Files, extends and overrides
# ----------------------------------------------------------------------------------------------


def default_recipes_dir() -> Path:
    """Where bare recipe names are looked up: ./recipes if it exists, else the recipes/ shipped
    next to the package."""
    local = Path.cwd() / "recipes"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes(recipes_dir: Path | None = None) -> list[str]:
    """Names (file stems) of the YAML recipes in ``recipes_dir``, sorted."""
    folder = Path(recipes_dir) if recipes_dir is not None else default_recipes_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml")})


def _looks_like_name(text: str) -> bool:
    return "/" not in text and "\\" not in text and not text.endswith((".yaml", ".yml"))


def _find_recipe_file(path_or_name: str | Path, recipes_dir: Path) -> Path:
    text = str(path_or_name)
    candidates: list[Path] = []
    if isinstance(path_or_name, str) and _looks_like_name(text):
        candidates += [recipes_dir / f"{text}.yaml", recipes_dir / f"{text}.yml", Path(text)]
    else:
        candidates.append(Path(text))
        # `medical-tiny.yaml` typed from another folder still means the bundled recipe.
        if len(Path(text).parts) == 1:
            candidates.append(recipes_dir / text)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = list_recipes(recipes_dir)
    hint = f"; available recipes in {recipes_dir}: {', '.join(available)}" if available else f"; no recipes in {recipes_dir}"
    close = difflib.get_close_matches(Path(text).stem, available, n=1)
    if close:
        hint = f"; did you mean '{close[0]}'?" + hint
    raise RecipeError(f"recipe {text!r} not found (looked for {', '.join(map(str, candidates))}){hint}")


def _find_parent(ref: str, child: Path, recipes_dir: Path) -> Path | None:
    base = child.parent / ref
    candidates = [base]
    if not base.suffix:
        candidates += [base.with_name(base.name + ".yaml"), base.with_name(base.name + ".yml")]
    if _looks_like_name(ref):
        # A bare name may also refer to a bundled recipe when the child lives elsewhere.
        candidates += [recipes_dir / f"{ref}.yaml", recipes_dir / f"{ref}.yml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def is_resolved(data: Any) -> bool:
    """True for what :func:`save_resolved` writes (a run's recipe.yaml): ``recipe:`` and ``sources:``."""
    return isinstance(data, dict) and isinstance(data.get("recipe"), dict) and set(data) <= {"recipe", "sources"}


def _read_layers(path: Path, recipes_dir: Path, top_name: str, chain: list[Path],
                 saved: dict[str, dict] | None = None) -> list[Layer]:
    """The layers of ``path`` and its ``extends`` ancestors, ancestors first. A resolved recipe
    (a run's recipe.yaml) is one layer, its body; its ``sources:`` go into ``saved`` by label."""
    label = path.name

    def fail(message: str, where: str = "(file)") -> RecipeError:
        return format_error(top_name, [f"{label}: {where}: {message}"])

    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(p.name for p in [*chain[chain.index(resolved):], resolved])
        # Attribute the cycle to the file whose `extends` closed it.
        raise format_error(top_name, [f"{chain[-1].name}: extends: extends cycle: {names}"])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read file: {exc}") from exc
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise fail(f"invalid YAML: {yaml_error_text(exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail(f"top level must be a mapping of settings, got {describe(data)}")
    if is_resolved(data):  # complete by itself: no extends
        if saved is not None and isinstance(data.get("sources"), dict):
            saved[label] = data["sources"]
        return [(label, dict(data["recipe"]))]
    data = dict(data)
    ref = data.pop("extends", None)
    layers: list[Layer] = []
    if ref is not None:
        if not isinstance(ref, str) or not ref.strip():
            raise fail(f"must be a recipe name or relative path, got {describe(ref)}", "extends")
        parent = _find_parent(ref.strip(), path, recipes_dir)
        if parent is None:
            raise fail(f"parent recipe {ref!r} not found next to {path.name} or in {recipes_dir}", "extends")
        layers = _read_layers(parent, recipes_dir, top_name, [*chain, resolved], saved)
    layers.append((label, data))
    return layers


def _override_layer(text: str) -> tuple[dict | None, str | None]:
    """Parse ``a.b=value`` into a nested dict; on failure return (None, problem)."""
    if "=" not in text:
        return None, "override must look like key.path=value (no '=' found)"
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p.strip() for p in parts):
        return None, f"override key {key!r} is not a dotted path such as train.lr"
    parts = [p.strip() for p in parts]
    tp = leaf_type(parts)
    plain_str = tp is str
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError as exc:
        if tp is not None and coerce("", tp) is not NO:
            value = raw.strip()  # text that YAML chokes on is still a fine string value
        else:
            return None, f"cannot parse value {raw.strip()!r}: {yaml_error_text(exc)}"
    else:
        if plain_str and raw.strip() == "":
            value = ""
        elif (
            tp is not None
            and coerce("", tp) is not NO
            and value is not None
            and not isinstance(value, (str, list))
        ):
            # `model.path=123` or `data.system_prompt=Answer: briefly` meant the literal text.
            value = raw.strip()
    nested: dict = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested, None


def load_recipe(
    path_or_name: str | Path,
    overrides: Sequence[str] = (),
    recipes_dir: Path | None = None,
) -> Recipe:
    """Load, merge (``extends``), override and validate a recipe.

    ``path_or_name`` is a YAML path or a bare name looked up in ``recipes_dir`` (default:
    ``./recipes`` if it exists, else the ``recipes/`` folder shipped next to the package).
    ``overrides`` are ``dotted.path=value`` strings whose values are parsed as YAML. A file
    written by :func:`save_resolved` (a run's ``recipe.yaml``) is a recipe too, keeping where
    each of its values came from.
    Raises :class:`RecipeError` listing every problem at once.
    """
    folder = Path(recipes_dir) if recipes_dir is not None else default_recipes_dir()
    path = _find_recipe_file(path_or_name, folder)
    top_name = path.stem
    saved: dict[str, dict] = {}
    layers = _read_layers(path, folder, top_name, [], saved)
    # The name comes from the file that was asked for, never from a parent, so that a child
    # recipe gets its own run folder.
    top_label, top_data = layers[-1]
    if "name" not in top_data:
        layers[-1] = (top_label, {"name": top_name, **top_data})

    extra: list[tuple[str, str, str]] = []
    for text in overrides:
        nested, problem = _override_layer(str(text))
        if problem is not None:
            extra.append((OVERRIDE_SOURCE, str(text).partition("=")[0].strip() or str(text), problem))
        else:
            layers.append((OVERRIDE_SOURCE, nested))

    header = top_name
    name_index = layer_index(layers, "name")
    if name_index >= 0 and isinstance(layers[name_index][1].get("name"), str) and layers[name_index][1]["name"]:
        header = layers[name_index][1]["name"]
    recipe = resolve_layers(layers, header, extra)
    for label, sources in saved.items():
        for key, source in recipe._sources.items():
            if source == f"recipe:{label}" and isinstance(sources.get(key), str):
                recipe._sources[key] = sources[key]
    return recipe


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a nested plain dict (private fields left out)."""

    def convert(obj: Any) -> Any:
        if is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in public_fields(type(obj))}
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        return copy.deepcopy(obj)

    return convert(recipe)


def recipe_provenance(recipe: Recipe) -> dict[str, str]:
    """Where each leaf setting came from: ``default``, ``recipe:<file name>`` or ``override``.

    A recipe built in code (not by :func:`load_recipe`) reports every setting as ``default``.
    """
    sources = getattr(recipe, "_sources", {}) or {}
    return {path: sources.get(path, DEFAULT_SOURCE) for path in leaf_paths()}


def save_resolved(recipe: Recipe, path: Path) -> None:
    """Write the fully resolved recipe (``recipe:``) and each setting's origin (``sources:``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = recipe_to_dict(recipe)
    if recipe.stages:
        body["stages"] = [stage for _, stage, _ in recipe.stages]
    body = yaml.safe_dump(
        {"recipe": body, "sources": recipe_provenance(recipe)},
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
    )
    header = (
        f"# Resolved recipe '{recipe.name}'. Re-create the run with finetune.recipe.load_resolved().\n"
        "# sources: default | recipe:<file that set it> | override\n"
    )
    fsutil.atomic_write_text(path, header + body)


def load_resolved(path: Path) -> Recipe:
    """Read a file written by :func:`save_resolved` back into a validated :class:`Recipe`.

    The values come from ``recipe:``; ``sources:`` is not used as settings, but it restores the
    original provenance so a re-saved run keeps recording where its values came from.
    """
    path = Path(path)
    label = path.name
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read resolved recipe {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise format_error(path.stem, [f"{label}: (file): invalid YAML: {yaml_error_text(exc)}"]) from exc
    if not isinstance(data, dict) or not isinstance(data.get("recipe"), dict):
        raise format_error(path.stem, [f"{label}: recipe: not a resolved recipe file (no top-level 'recipe:' mapping)"])
    body = data["recipe"]
    name = body.get("name") if isinstance(body.get("name"), str) and body.get("name") else path.stem
    recipe = resolve_layers([(label, body)], name)
    saved = data.get("sources")
    if isinstance(saved, dict):
        for key, value in saved.items():
            if key in recipe._sources and isinstance(value, str):
                recipe._sources[key] = value
    return recipe

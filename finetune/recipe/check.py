"""Building a Recipe from layers of settings: every problem at once, each with its dotted path and
the layer (recipe file or override) that set it.

:func:`fill` sets the fields from the merged mapping (types, unknown keys with a did-you-mean,
choices); :func:`check_recipe` then applies every bound and check the fields declare
(:func:`check_fields`, from their metadata in :mod:`finetune.recipe.fields`) and the few rules
that tie several fields together.
"""

from __future__ import annotations

import copy
import difflib
import math
import operator
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import Field, is_dataclass
from typing import Any

from finetune.recipe.fields import BOUNDS, DataSource, Recipe, RecipeError, public_fields, shards_weights, type_hints

# ----------------------------------------------------------------------------------------------
# Problems and provenance over layers
# ----------------------------------------------------------------------------------------------

# A layer is (label, nested dict); label is a file name or the override label. Layers are applied in
# order, so "who set this path" is answered by the last layer containing it.
Layer = tuple[str, dict]


def has_path(data: Any, parts: Sequence[str]) -> bool:
    """True when the nested mapping ``data`` holds the key path ``parts``."""
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def layer_index(layers: Sequence[Layer], path: str) -> int:
    """Index of the last layer that sets ``path`` (a list item: the layer that set the list); -1 if none."""
    parts = []
    for part in path.split(".") if path else []:
        parts.append(re.sub(r"\[\d+\]$", "", part))
        if parts[-1] != part:  # inside a list (data.train[1].weight): the layer that set the list
            break
    for i in range(len(layers) - 1, -1, -1):
        if has_path(layers[i][1], parts):
            return i
    return -1


def format_error(name: str, problems: Sequence[str]) -> RecipeError:
    """One RecipeError listing every problem of recipe ``name``, one per line."""
    lines = [f"recipe {name} has {len(problems)} problem(s):", *problems]
    return RecipeError("\n".join(lines), problems)


class Problems:
    """Collects (path, message) problems and attributes each to the layer that set the path."""

    def __init__(self, layers: Sequence[Layer], fallback: str):
        self.layers = layers
        self.fallback = fallback
        self.items: list[tuple[str | None, str, str]] = []

    def add(self, path: str, message: str, source: str | None = None) -> None:
        self.items.append((source, path, message))

    def latest(self, *paths: str) -> str:
        """Of several related paths, the one set by the latest layer (for attributing a clash)."""
        return max(paths, key=lambda p: layer_index(self.layers, p))

    def lines(self) -> list[str]:
        out = []
        for source, path, message in self.items:
            if source is None:
                i = layer_index(self.layers, path)
                source = self.layers[i][0] if i >= 0 else self.fallback
            out.append(f"{source}: {path}: {message}")
        return out


# ----------------------------------------------------------------------------------------------
# Type coercion
# ----------------------------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A value as messages show it: its type and a shortened repr."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def type_words(tp: Any) -> str:
    """A schema type in words (an integer, a string or null)."""
    if tp is type(None):
        return "null"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return f"a list of {type_words(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if is_union(tp):
        return " or ".join(type_words(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def is_union(tp: Any) -> bool:
    """True for ``X | Y`` and ``Optional[X]`` annotations."""
    return isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union


#: what :func:`coerce` returns for a value that does not fit the type
NO = object()


def coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp``, or ``NO`` if it does not fit."""
    if is_union(tp):
        for arg in typing.get_args(tp):
            out = coerce(value, arg)
            if out is not NO:
                return out
        return NO
    if tp is type(None):
        return None if value is None else NO
    if tp is bool:
        return value if isinstance(value, bool) else NO
    if tp is int:
        # bool is an int subclass; `r: true` is a mistake, not r=1.
        return value if isinstance(value, int) and not isinstance(value, bool) else NO
    if tp is float:
        if isinstance(value, bool):
            return NO
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            # YAML 1.1 only reads `2e-4` as a float when written `2.0e-4`, so plain
            # scientific notation arrives here as a string.
            try:
                out = float(value.strip())
            except ValueError:
                return NO
        else:
            return NO
        return out if math.isfinite(out) else NO
    if tp is str:
        return value if isinstance(value, str) else NO
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return NO
        (item_tp,) = typing.get_args(tp)
        items = [coerce(v, item_tp) for v in value]
        return NO if any(i is NO for i in items) else items
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            return NO
        key_tp, value_tp = typing.get_args(tp)
        out = {coerce(k, key_tp): coerce(v, value_tp) for k, v in value.items()}
        return NO if any(k is NO or v is NO for k, v in out.items()) else out
    if is_dataclass(tp):
        return NO  # sections and sources are filled by fill(), which reports their own problems
    raise TypeError(f"unsupported schema type {tp!r}")  # a schema bug, not a user error


# ----------------------------------------------------------------------------------------------
# Building and checking
# ----------------------------------------------------------------------------------------------


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    """The problem of an unknown key: the closest valid one, or the list of them."""
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; valid keys: {', '.join(valid)}"


def fill(obj: Any, raw: dict, prefix: str, problems: Problems) -> None:
    """Set the fields of dataclass ``obj`` from ``raw``, recording every problem.

    Starts from ``obj``'s own defaults (not the class defaults) so that per-role defaults such as
    ``roles.llm.mode = lora`` survive a partial ``roles.llm`` section. A bad value keeps the
    default, which keeps later semantic checks from piling up follow-on errors.
    """
    cls = type(obj)
    hints = type_hints(cls)
    valid = [f.name for f in public_fields(cls)]
    for key in raw:
        if not isinstance(key, str) or key not in valid:
            problems.add(f"{prefix}{key}", unknown_key_message(str(key), valid))
    for f in public_fields(cls):
        if f.name not in raw:
            continue
        path = f"{prefix}{f.name}"
        value = raw[f.name]
        tp = hints[f.name]
        if is_dataclass(tp):
            if value is None:  # an empty section, e.g. `data:` with everything commented out
                continue
            if not isinstance(value, dict):
                problems.add(path, f"must be a mapping of settings, got {describe(value)}")
                continue
            fill(getattr(obj, f.name), value, f"{path}.", problems)
            continue
        if tp == str | list[DataSource]:
            out = fill_sources(value, path, problems)
            if out is not NO:
                setattr(obj, f.name, out)
            continue
        out = coerce(value, tp)
        if out is NO:
            problems.add(path, f"must be {type_words(tp)}, got {describe(value)}")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and out not in choices:
            allowed = ", ".join(repr(c) if c == "" else str(c) for c in choices)
            problems.add(path, f"invalid value {out!r}; allowed: {allowed}")
            continue
        setattr(obj, f.name, out)


def fill_sources(value: Any, path: str, problems: Problems) -> Any:
    """data.train: a path, one source mapping, or a list of paths and source mappings."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value, one = [value], True
    elif isinstance(value, list):
        one = False
    else:
        problems.add(path, f"must be a file path, a source mapping {{path: ...}} or a list of them, got "
                           f"{describe(value)}")
        return NO
    out = []
    for i, item in enumerate(value):
        where = path if one else f"{path}[{i}]"
        src = DataSource()
        if isinstance(item, str):
            src.path = item
        elif isinstance(item, dict):
            fill(src, item, f"{where}.", problems)
        else:
            problems.add(where, f"must be a file path or a source mapping {{path: ..., weight: ...}}, got "
                                f"{describe(item)}")
            continue
        src._index = i
        out.append(src)
    return out


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_SYMBOL = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds_text(meta: Any) -> str:
    """A field's declared bounds in words: '>= 1', '> 0', 'in [0, 1)'."""
    lo = next(((k, meta[k]) for k in ("ge", "gt") if k in meta), None)
    hi = next(((k, meta[k]) for k in ("le", "lt") if k in meta), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
    key, bound = lo or hi
    return f"{_SYMBOL[key]} {bound}"


def field_problem(f: Field, value: Any) -> str | None:
    """What is wrong with ``value`` by field ``f``'s declared bounds and check; None when nothing."""
    meta = f.metadata
    if value is None:
        return None  # a field that takes null says what it means
    if not all(_COMPARE[k](value, meta[k]) for k in BOUNDS if k in meta):
        why = f" ({meta['why']})" if meta.get("why") else ""
        return f"must be {_bounds_text(meta)}{why}, got {value}"
    if "check" in meta:
        return meta["check"](value)
    return None


def check_fields(obj: Any, prefix: str, problems: Problems) -> None:
    """Report every value of dataclass ``obj`` (its sections and data sources included) outside
    what its field declares, under the value's dotted path."""
    for f in public_fields(type(obj)):
        path = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if is_dataclass(value):
            check_fields(value, f"{path}.", problems)
            continue
        problem = field_problem(f, value)
        if problem is not None:
            problems.add(path, problem)
        if isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):  # data.train's sources, named as the recipe lists them
                    check_fields(item, f"{path}[{getattr(item, '_index', i)}].", problems)


def check_recipe(recipe: Recipe, problems: Problems, staged: bool = False) -> None:
    """Every declared bound and check (:func:`check_fields`), then the rules between fields
    (`staged`: the recipe has stages, whose own roles are checked with each stage)."""
    check_fields(recipe, "", problems)
    add = problems.add
    m = recipe.model
    if m.max_pixels < m.min_pixels:
        add("model.max_pixels", f"must be >= model.min_pixels ({m.min_pixels}), got {m.max_pixels}")

    roles = recipe.roles
    for role, cfg in roles.items():
        p = f"roles.{role}"
        for key in ("experts", "router"):
            if getattr(cfg, key) != "frozen" and (role != "llm" or cfg.mode != "lora"):
                add(f"{p}.{key}", f"is {getattr(cfg, key)!r}, but only roles.llm with mode lora has experts and "
                                  f"routers to train; set {p}.{key}: frozen" + (" or roles.llm.mode: lora"
                                                                                if role == "llm" else ""))
    if roles.audio_head.mode != "frozen":
        add(
            "roles.audio_head.mode",
            f"must be frozen, got {roles.audio_head.mode!r}: this toolkit does not train speech output",
        )
    if m.quantize != "none" and roles.llm.mode == "full":
        path = problems.latest("model.quantize", "roles.llm.mode")
        add(
            path,
            f"cannot fully train a quantized LLM (model.quantize={m.quantize}, roles.llm.mode=full): "
            "quantized weights cannot be updated; use roles.llm.mode: lora (QLoRA) or model.quantize: none",
        )
    method = recipe.train.method
    if method in ("dpo", "grpo") and not staged:
        full = [role for role, cfg in roles.items() if cfg.mode == "full"]
        if full:
            path = problems.latest("train.method", *(f"roles.{r}.mode" for r in full))
            add(path, f"train.method {method} compares the model with its reference, the same model with its LoRA "
                      f"adapters disabled; fully trained roles ({', '.join(full)}) would change the reference too; set "
                      f"{', '.join(f'roles.{r}.mode' for r in full)}: lora (a second full copy of the model as the "
                      "reference is not supported)")
        elif not any(cfg.mode == "lora" for _, cfg in roles.items()):
            add("train.method", f"train.method {method} trains LoRA adapters (the reference is the model with them "
                                "disabled); set e.g. roles.llm.mode: lora")
        if not recipe.data.packing:
            path = problems.latest("train.method", "data.packing")
            what = "each pair's chosen and rejected answers" if method == "dpo" else "each prompt's sampled answers"
            add(path, f"train.method {method} packs {what} as isolated samples in the same rows; set "
                      "data.packing: true")
    if all(cfg.mode == "frozen" for _, cfg in roles.items()) and not staged:
        add("roles", "every role is frozen, so nothing would be trained; set e.g. roles.llm.mode: lora")

    d = recipe.data
    if d.demo and not d.sources():
        add("data.demo", "needs data.train: the demo dataset is written to data.train's path")
    if isinstance(d.train, list):
        labels = [s.label for s in d.train]
        for i, src in enumerate(d.train):
            p = f"data.train[{src._index}]"
            if bool(src.path) == bool(src.hub):
                add(p, "needs exactly one of path (a file or folder) and hub (a dataset's hub id), got "
                       + ("both" if src.path else "neither"))
            if src.hub and src.format == "jsonl":
                add(f"{p}.format", "a hub dataset is read with `datasets`: use format: hf or auto")
            if labels.count(src.label) > 1 and labels.index(src.label) == i:
                add(f"{p}.name", f"two sources are both named {src.label!r}; give each a distinct name")

    t = recipe.train
    if t.epochs <= 0 and t.max_steps <= 0:
        add("train.epochs", f"must be > 0 unless train.max_steps > 0, got {t.epochs}")
    if m.quantize == "8bit" and shards_weights(recipe):
        # bitsandbytes' int8 weights carry their scales in the parameter object, which the
        # engines' flat shards do not keep; 4-bit weights are stored in the compute dtype for them
        path = problems.latest("model.quantize", "train.distributed")
        ds = t.deepspeed.strip()
        add(path, f"model.quantize=8bit cannot be combined with sharded weights "
                  f"(train.distributed={t.distributed}{', ' + ds if t.distributed == 'deepspeed' else ''}); "
                  "use model.quantize: 4bit (QLoRA shards under ZeRO-3 and FSDP), or train.distributed: ddp, "
                  "or deepspeed with train.deepspeed: zero2")


def deep_merge(base: dict, over: dict) -> None:
    """Merge ``over`` into ``base`` in place: mappings merge, everything else replaces."""
    for key, value in over.items():
        current = base.get(key)
        if isinstance(current, dict):
            if isinstance(value, dict):
                deep_merge(current, value)
                continue
            if value is None:  # an emptied-out section keeps what the parent had
                continue
        base[key] = copy.deepcopy(value)


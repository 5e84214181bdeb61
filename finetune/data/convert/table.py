"""A table (CSV, TSV, JSONL or a JSON list of rows) turned into samples through a YAML template
(see ``data_templates/README.md``): :func:`load_template` reads and checks the template,
:func:`convert_table` applies it to every row. Every column the template names must be in the
table."""

from __future__ import annotations

import csv
import json
import os
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.data.convert.records import (
    ConvertResult,
    _check_on_error,
    _did_you_mean,
    _Loc,
    _media_part,
    _read_records,
    _type_name,
    _validate,
)
from finetune.data.schema import PART_TYPES, DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


_TEMPLATE_KEYS = ("name", "description", "task", "id", "system", "user", "assistant", "turns",
                  "answer", "keep")
_TURN_KEYS = ("user", "assistant", "optional")
_PART_OPTIONS = ("optional", "sep", "extra")
_RESERVED = ("messages", "id", "task", "answer")


@dataclass
class TemplatePart:
    """One user-turn part: text with ``{column}`` placeholders, or a media reference."""

    kind: str
    value: str
    optional: bool = False
    sep: str | None = None
    extra: dict = field(default_factory=dict)
    where: str = ""


@dataclass
class TemplateTurn:
    """A user turn and the assistant reply to it."""

    user: list[TemplatePart]
    assistant: str
    optional: bool = False
    where: str = ""


@dataclass
class Template:
    """A parsed, validated table-to-sample template (see ``data_templates/README.md``)."""

    path: str
    turns: list[TemplateTurn]
    name: str = ""
    description: str = ""
    task: str | None = None
    id: str | None = None
    system: str | None = None
    answer: str | None = None
    keep: list[str] = field(default_factory=list)

    def columns(self) -> dict[str, str]:
        """Every column the template reads, mapped to the first template key that reads it."""
        cols: dict[str, str] = {}

        def add(text: str | None, where: str) -> None:
            for c in _placeholders(text or ""):
                cols.setdefault(c, where)

        for key in ("task", "id", "system", "answer"):
            add(getattr(self, key), key)
        for turn in self.turns:
            for part in turn.user:
                add(part.value, part.where)
            add(turn.assistant, f"{turn.where}.assistant" if turn.where else "assistant")
        for c in self.keep:
            cols.setdefault(c, "keep")
        return cols


def _placeholders(text: str) -> list[str]:
    """Column names in ``text`` ({column}; literal braces are {{ and }}). Raises ValueError."""
    names = []
    for _, name, spec, conv in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.strip():
            raise ValueError("an empty placeholder '{}'")
        if spec or conv:
            raise ValueError(f"placeholder '{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}' "
                             "has a format spec or conversion")
        names.append(name)
    return names


class _TemplateReader:
    def __init__(self, path: str) -> None:
        self.path = path

    def err(self, fld: str, problem: str, fix: str, line: int = 0) -> DataError:
        return DataError("template", problem, fix, file=self.path, line=line, field=fld)

    def string(self, value: Any, fld: str) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.err(fld, f"'{fld}' is {_type_name(value)}, not a string",
                           "write it as a string (quote it if it contains ':' or starts with '{')")
        text = str(value)
        try:
            _placeholders(text)
        except ValueError as e:
            raise self.err(fld, f"bad placeholder in {json.dumps(text[:80])}: {e}",
                           "write {column} with a column name of the table; write literal braces as {{ and }}")
        return text

    def keys(self, mapping: dict, allowed: tuple[str, ...], fld: str, what: str) -> None:
        for key in mapping:
            if key not in allowed:
                where = f"{fld}.{key}" if fld else str(key)
                raise self.err(where, f"unknown key '{key}' in {what}",
                               f"{_did_you_mean(key, allowed)}allowed keys: {', '.join(allowed)}")

    def flag(self, value: Any, fld: str) -> bool:
        if not isinstance(value, bool):
            raise self.err(fld, f"'{fld}' is {_type_name(value)}, not true/false", "write true or false")
        return value

    def part(self, raw: Any, fld: str) -> TemplatePart:
        if isinstance(raw, str):
            return TemplatePart("text", self.string(raw, fld), where=fld)
        if not isinstance(raw, dict):
            raise self.err(fld, f"the part is {_type_name(raw)}",
                           "write a part as a string (text) or as {text|image|audio|video: \"{column}\"}")
        kinds = [k for k in raw if k in PART_TYPES]
        if len(kinds) != 1:
            problem = ("the part has none of text, image, audio, video" if not kinds
                       else f"the part has several kinds ({', '.join(kinds)})")
            others = [k for k in raw if k not in PART_TYPES and k not in _PART_OPTIONS]
            hint = _did_you_mean(others[0], PART_TYPES) if others and not kinds else ""
            raise self.err(fld, problem, f"{hint}give exactly one of text, image, audio, video per part "
                           "(make several parts for several items)")
        kind = kinds[0]
        self.keys(raw, (kind,) + _PART_OPTIONS, fld, f"a {kind} part")
        part = TemplatePart(kind, self.string(raw[kind], f"{fld}.{kind}"), where=f"{fld}.{kind}")
        if "optional" in raw:
            part.optional = self.flag(raw["optional"], f"{fld}.optional")
        if "sep" in raw:
            if kind == "text":
                raise self.err(f"{fld}.sep", "'sep' only applies to image, audio and video parts",
                               "remove 'sep' from the text part")
            if not isinstance(raw["sep"], str) or not raw["sep"]:
                raise self.err(f"{fld}.sep", "'sep' must be a non-empty string", 'e.g. sep: ";"')
            part.sep = raw["sep"]
        if "extra" in raw:
            if not isinstance(raw["extra"], dict):
                raise self.err(f"{fld}.extra", "'extra' must be a mapping", "e.g. extra: {window: lung}")
            part.extra = dict(raw["extra"])
        return part

    def turn(self, raw: Any, fld: str) -> TemplateTurn:
        if not isinstance(raw, dict):
            raise self.err(fld, f"the turn is {_type_name(raw)}, not a mapping",
                           "write a turn as {user: ..., assistant: ...}")
        self.keys(raw, _TURN_KEYS, fld, "a turn")
        prefix = f"{fld}." if fld else ""
        for key in ("user", "assistant"):
            if key not in raw:
                raise self.err(f"{prefix}{key}", f"the turn has no '{key}'",
                               f"add '{key}:' (the {key} turn's content)")
        user = raw["user"]
        if isinstance(user, (str, dict)):
            user = [user]
        if not isinstance(user, list) or not user:
            raise self.err(f"{prefix}user", "'user' must be a string or a non-empty list of parts",
                           "e.g. user: [{image: \"{image}\"}, \"{question}\"]")
        parts = [self.part(p, f"{prefix}user[{k}]") for k, p in enumerate(user)]
        turn = TemplateTurn(parts, self.string(raw["assistant"], f"{prefix}assistant"), where=fld)
        if "optional" in raw:
            turn.optional = self.flag(raw["optional"], f"{prefix}optional")
        return turn


def load_template(path: str | os.PathLike) -> Template:
    """Read and validate a template YAML file; problems raise :class:`DataError` (kind ``template``)."""
    import yaml

    path = Path(path)
    rd = _TemplateReader(str(path))
    if not path.is_file():
        raise DataError("missing_file", f"template '{path}' does not exist", "check the template path",
                        file=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise rd.err("", f"invalid YAML: {getattr(e, 'problem', None) or e}",
                     "fix the YAML syntax there (quote strings that start with '{')",
                     line=mark.line + 1 if mark else 0) from None
    except UnicodeDecodeError:
        raise rd.err("", "the file is not valid UTF-8", "re-save the template as UTF-8") from None
    if not isinstance(raw, dict):
        raise rd.err("", f"the template is {_type_name(raw)}, not a mapping",
                     "write the template as YAML keys: system, user, assistant, answer, ...")
    rd.keys(raw, _TEMPLATE_KEYS, "", "the template")
    if "turns" in raw:
        for key in ("user", "assistant"):
            if key in raw:
                raise rd.err(key, f"both 'turns' and a top-level '{key}'",
                             f"move '{key}' into the first entry of 'turns', or drop 'turns'")
        turns_raw = raw["turns"]
        if not isinstance(turns_raw, list) or not turns_raw:
            raise rd.err("turns", "'turns' must be a non-empty list",
                         "write turns as a list of {user: ..., assistant: ...}")
        turns = [rd.turn(t, f"turns[{i}]") for i, t in enumerate(turns_raw)]
        if turns[0].optional:
            raise rd.err("turns[0].optional", "the first turn cannot be optional",
                         "remove 'optional' from the first turn")
    else:
        turns = [rd.turn({k: raw[k] for k in ("user", "assistant") if k in raw}, "")]
    tpl = Template(path=str(path), turns=turns)
    for key in ("name", "description", "task", "id", "system", "answer"):
        if raw.get(key) is not None:
            setattr(tpl, key, rd.string(raw[key], key))
    keep = raw.get("keep") or []
    if not isinstance(keep, list) or not all(isinstance(c, str) for c in keep):
        raise rd.err("keep", "'keep' must be a list of column names", "e.g. keep: [patient_age, site]")
    for c in keep:
        if c in _RESERVED:
            raise rd.err("keep", f"column '{c}' cannot be kept: '{c}' is a sample key",
                         f"use the template key '{c}:' instead" if c != "messages" else "rename the column")
    tpl.keep = list(keep)
    return tpl


def _read_table(path: Path) -> tuple[list[str] | None, list[tuple[_Loc, Any]]]:
    """(CSV header or None, [(location, row dict or DataError)])."""
    source = str(path)
    if not path.is_file():
        raise DataError("missing_file", f"table '{path}' does not exist", "check the table path", file=source)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        if suffix not in (".jsonl", ".json"):
            raise DataError("table", f"unsupported table type '{suffix}'",
                            f"use one of {', '.join(TABLE_SUFFIXES)}", file=source)
        return None, list(_read_records(path))
    rows: list[tuple[_Loc, Any]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DataError("table", "the table has no header row",
                                "put the column names on the first line", file=source, line=1)
            header = [h.strip() for h in header]
            dupes = [h for h, n in Counter(header).items() if n > 1]
            if dupes:
                raise DataError("table", f"duplicate column name(s): {', '.join(dupes)}",
                                "give every column a unique name", file=source, line=1)
            for values in reader:
                loc = _Loc(source, reader.line_num)
                if not any(v.strip() for v in values):
                    continue
                if len(values) > len(header):
                    rows.append((loc, loc.err("table", "", f"the row has {len(values)} fields but the header "
                                              f"has {len(header)} columns",
                                              "quote fields that contain the delimiter, or fix the row")))
                    continue
                rows.append((loc, dict(zip(header, values + [""] * (len(header) - len(values))))))
    except UnicodeDecodeError:
        raise DataError("encoding", "the table is not valid UTF-8",
                        "re-save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)", file=source) from None
    except csv.Error as e:
        raise DataError("table", f"unreadable CSV: {e}", "fix the quoting of that row", file=source) from None
    return header, rows


class _Skip(Exception):
    """An optional part or turn whose columns are empty."""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _render(text: str, row: dict, loc: _Loc, where: str, optional: bool) -> str:
    """Fill ``{column}`` placeholders; an empty/missing value raises _Skip (optional) or DataError."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is None:
            continue
        value = _cell(row.get(name))
        if not value.strip():
            if optional:
                raise _Skip
            state = "missing" if name not in row else "empty"
            raise loc.err("empty_value", name, f"column '{name}' is {state} (used by the template's '{where}')",
                          "fill in the value, or mark that part/turn 'optional: true' in the template")
        out.append(value)
    return "".join(out)


def _render_media(part: TemplatePart, row: dict, loc: _Loc, base: Path, check_files: bool) -> list[dict]:
    names = _placeholders(part.value)
    raw: Any
    if len(names) == 1 and part.value == f"{{{names[0]}}}" and isinstance(row.get(names[0]), list):
        raw = [v for v in row[names[0]] if _cell(v).strip()]  # a JSON list column: several files
        if not raw:
            if part.optional:
                raise _Skip
            raise loc.err("empty_value", names[0], f"column '{names[0]}' is an empty list",
                          "list at least one file, or mark the part 'optional: true'")
    else:
        raw = _render(part.value, row, loc, part.where, part.optional)
        if part.sep is not None:
            raw = [v.strip() for v in raw.split(part.sep) if v.strip()]
    fld = names[0] if len(names) == 1 else part.where
    if part.kind == "video" and isinstance(raw, list):
        return [{**_media_part("video", raw, loc, fld, base, check_files), **part.extra}]
    values = raw if isinstance(raw, list) else [raw]
    return [{**_media_part(part.kind, v, loc, fld, base, check_files), **part.extra} for v in values]


def _apply_template(tpl: Template, row: Any, loc: _Loc, default_id: str, base: Path, check_files: bool) -> dict:
    loc.need_object(row, "not_object", "", "row", "write each table row as a JSON object {column: value}")

    def top(key: str) -> str | None:
        text = getattr(tpl, key)
        if text is None:
            return None
        try:
            value = _render(text, row, loc, key, optional=True)
        except _Skip:
            return None
        return value if value.strip() else None

    messages: list[dict] = []
    system = top("system")
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in tpl.turns:
        try:
            parts: list[dict] = []
            for part in turn.user:
                try:
                    if part.kind == "text":
                        text = _render(part.value, row, loc, part.where, part.optional or turn.optional)
                        if text.strip():
                            parts.append({"type": "text", "text": text, **part.extra})
                    else:
                        parts += _render_media(
                            TemplatePart(part.kind, part.value, part.optional or turn.optional, part.sep,
                                         part.extra, part.where), row, loc, base, check_files)
                except _Skip:
                    if not part.optional:
                        raise  # an empty required part of an optional turn drops the turn
            where = f"{turn.where}.assistant" if turn.where else "assistant"
            reply = _render(turn.assistant, row, loc, where, turn.optional)
        except _Skip:
            continue
        if not parts:
            raise loc.err("empty", turn.where or "user", "the user turn has no parts left (all optional parts were empty)",
                          "fill in at least one of the turn's columns")
        if len(parts) == 1 and parts[0]["type"] == "text" and len(parts[0]) == 2:
            messages.append({"role": "user", "content": parts[0]["text"]})
        else:
            messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": reply})

    sample: dict[str, Any] = {"id": top("id") or default_id}
    task = top("task")
    if task is not None:
        sample["task"] = task
    sample["messages"] = messages
    answer = top("answer")
    if answer is not None:
        sample["answer"] = answer
    for c in tpl.keep:
        if c in row:
            sample[c] = row[c]
    _validate(sample, loc)
    return sample


def convert_table(
    template: Template | str | os.PathLike,
    table: str | os.PathLike,
    *,
    media_root: str | os.PathLike | None = None,
    on_error: str = "raise",
    check_files: bool = True,
) -> ConvertResult:
    """Turn every row of a CSV/TSV/JSONL/JSON-list table into a sample through a template.

    Every column the template names must be in the table (a template/table
    mismatch always raises, even with ``on_error="skip"``). Media paths are
    resolved against ``media_root`` (default: the table's folder).
    """
    _check_on_error(on_error)
    tpl = template if isinstance(template, Template) else load_template(template)
    table = Path(table)
    header, rows = _read_table(table)
    if header is not None:
        available = set(header)
    else:
        available = {k for _, r in rows if isinstance(r, dict) for k in r}
    for col, where in tpl.columns().items():
        if col not in available and rows:
            hint = _did_you_mean(col, sorted(available))
            raise DataError("missing_column",
                            f"column '{col}' (used by template key '{where}' of {tpl.path}) is not in the table",
                            f"{hint}columns: {', '.join(sorted(available)) or '(none)'}; fix the template "
                            "or rename the column", file=str(table), line=1 if header is not None else 0)
    base = Path(media_root) if media_root is not None else table.parent
    result = ConvertResult(source=str(table), format="template")
    for n, (loc, row) in enumerate(rows, start=1):
        result.add(loc, row, lambda: _apply_template(tpl, row, loc, f"{table.stem}-{n}", base, check_files), on_error)
    if result.n_records == 0:
        raise DataError("empty", "the table has no rows", "add rows under the header", file=str(table))
    return result

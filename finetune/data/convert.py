"""Convert other tools' datasets, and CSV/JSONL tables through a template, into our JSONL.

Sources:

- ``llamafactory``: LLaMA-Factory ShareGPT-style records (``messages`` with
  role/content, or ``conversations`` with from/value; alpaca
  ``instruction``/``input``/``output`` too) whose text holds ``<image>``,
  ``<audio>``, ``<video>`` placeholders, with ``images``/``audios``/``videos``
  list columns. The number of placeholders must equal the number of files.
  Also its v1 records (``text``/``image_url``/``audio_url``/``video_url``
  parts with ``value``, a ``loss_weight`` per turn: 0 on an answer keeps it as
  context, ``"loss": false`` here), and a dataset named through its list as
  ``folder/dataset_info.json#name`` (file_name, formatting, columns, tags;
  media relative to the list's folder, as LLaMA-Factory's media_dir).
- ``swift``: ms-swift records: the same ``messages`` + media columns (and
  ``query``/``response``/``history``). Like ms-swift, files without a
  placeholder are put at the start of the first user turn; more placeholders
  than files is an error.
- ``openai``: OpenAI chat ``messages`` whose content is a list of ``text``,
  ``image_url``, ``input_audio`` (and ``audio_url``/``video_url``) parts that
  point to **local** files. Remote URLs are refused: nothing is downloaded.
- ``ours``: our own format (re-written with paths relative to the output).
- a table (CSV/TSV/JSONL/JSON list) plus a YAML template (see
  ``data_templates/README.md``).

Every record-level problem is a :class:`~finetune.data.schema.DataError` that
names the file, the line (or ``record[i]`` for JSON lists), the field and a
fix. ``on_error="skip"`` collects them instead of raising. A record another
converter reads is refused with that converter's ``--from`` (never one that
refuses it in turn). Preference data (chosen/rejected answers, in any of the
forms LLaMA-Factory, ms-swift or we write) is one error for the whole file.

Files given as data (``data.train``, ``data check``) are read with
:func:`read_converted`: the format is recognised from the first records, and
media must lie inside the dataset's folder unless data.allow_outside_paths, as
for our JSONL.

Usage (also ``python -m finetune data convert ...``)::

    python -m finetune.data.convert --template T.yaml table.csv out.jsonl
    python -m finetune.data.convert --from llamafactory data.json out.jsonl
    python -m finetune.data.convert data/dataset_info.json#mllm_demo out.jsonl
"""

from __future__ import annotations

import argparse
import copy
import csv
import difflib
import itertools
import json
import os
import re
import string
import sys
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import fsutil
from finetune.data.schema import (
    MEDIA_TYPES,
    PART_TYPES,
    DataError,
    Sample,
    iter_jsonl,
    load_samples,
    parse_sample,
)
from finetune.errors import ConfigError

FORMATS = ("ours", "llamafactory", "swift", "openai")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")

_TAG_RE = re.compile(r"<(image|audio|video)>")
_MEDIA_COLUMN = {"image": "images", "audio": "audios", "video": "videos"}
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Role names of the ShareGPT/LLaMA-Factory/ms-swift/OpenAI formats mapped to ours.
_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TOOL_ROLES = ("observation", "function_call", "function", "tool", "tool_call", "tool_response", "ipython")

_OPENAI_PART_TYPES = ("image_url", "input_image", "input_audio", "audio_url", "video_url",
                      "input_text", "output_text")


# --------------------------------------------------------------------------- results


@dataclass
class ConvertResult:
    """Samples (our JSONL objects, media paths absolute) and the records that failed."""

    source: str
    format: str
    samples: list[dict] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    n_records: int = 0
    locations: list["_Loc"] = field(default_factory=list)  # where each sample's record is in the source

    def add(self, loc: "_Loc", record: Any, make: Callable[[], dict], on_error: str) -> None:
        """One source record: keep the sample `make` builds and where it came from, or its error."""
        self.n_records += 1
        try:
            if isinstance(record, DataError):
                raise record
            self.samples.append(make())
            self.locations.append(loc)
        except DataError as e:
            if on_error == "raise":
                raise
            self.errors.append(e)

    def error_counts(self) -> dict[str, int]:
        """Number of skipped records per error kind, most frequent first."""
        return dict(Counter(e.kind for e in self.errors).most_common())


@dataclass(frozen=True)
class _Loc:
    """Where a record lives: a 1-based line (JSONL/CSV) or a 0-based index (JSON list)."""

    file: str
    line: int = 0
    index: int = -1

    def field(self, fld: str = "") -> str:
        if self.line <= 0 and self.index >= 0:
            return f"record[{self.index}]" + (f".{fld}" if fld else "")
        return fld

    def err(self, kind: str, fld: str, problem: str, fix: str = "") -> DataError:
        return DataError(kind, problem, fix, file=self.file, line=self.line, field=self.field(fld))

    def relocate(self, e: DataError) -> DataError:
        """An error raised by :func:`parse_sample` with the record index added."""
        return DataError(e.kind, e.problem, e.fix, file=self.file, line=self.line,
                         field=self.field(e.field))


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _did_you_mean(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value).lower(), list(choices), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


# --------------------------------------------------------------------------- reading


def _is_json_document(path: Path) -> bool:
    """A JSON list (or one object in a .json file), read whole, rather than JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[") or (head.startswith(b"{") and path.suffix.lower() == ".json")


def _read_records(path: Path) -> Iterator[tuple[_Loc, Any]]:
    """Yield ``(location, object_or_DataError)`` from a JSON list or a JSONL file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError("missing_file", f"input file '{path}' does not exist", "check the file path",
                        file=source)
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if _is_json_document(path):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise DataError("encoding", "the file is not valid UTF-8",
                            "re-save the file as UTF-8", file=source) from None
        except json.JSONDecodeError as e:
            if head.startswith(b"{"):
                data = None  # several objects: treat as JSONL below
            else:
                raise DataError("json", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                                "fix the JSON syntax there (a JSON list of records is expected)",
                                file=source, line=e.lineno) from None
        if data is not None:
            records = data if isinstance(data, list) else [data]
            for i, obj in enumerate(records):
                yield _Loc(source, 0, i), obj
            return
    for lineno, obj in iter_jsonl(path):
        yield _Loc(source, lineno), obj


# --------------------------------------------------------------------------- media paths


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    path = urllib.parse.unquote(parsed.path)
    if parsed.netloc and parsed.netloc != "localhost":
        # "file://img/a.png" is not a valid file URL but a common way to write a relative one.
        return parsed.netloc + path
    if not parsed.netloc and not url.lower().startswith("file:/"):
        return urllib.parse.unquote(url[len("file:"):])  # "file:img/a.png"
    return path


def _found_under(base: Path, rel: Path) -> Path | None:
    """`rel` found inside `base` when it was written from a folder above it: LLaMA-Factory and
    ms-swift open paths from the folder they run in, so its own demo names
    `data/mllm_demo_data/1.jpg` beside `data/v1_multimodal_demo.jsonl`. The path must start with the
    names of `base`'s last folders (`data/`); what it names then lies inside `base`."""
    tail = Path(os.path.abspath(base)).parts
    for k in range(1, min(len(tail), len(rel.parts) - 1) + 1):
        if rel.parts[:k] == tail[-k:]:
            candidate = Path(base, *rel.parts[k:])
            if os.path.exists(candidate):
                return candidate
    return None


def _outside(full: str, within: Path) -> bool:
    # resolve() follows symlinks and '..', as finetune.data.schema does for our JSONL
    return not Path(full).resolve().is_relative_to(Path(within).resolve())


def _media_path(value: Any, loc: _Loc, fld: str, kind: str, base: Path, check_files: bool,
                within: Path | None = None) -> str:
    """A media reference (local path or file:// URL) as an absolute path string. With `within`, the
    file must lie inside that folder (symlinks followed), as our JSONL's media must lie inside the
    dataset file's folder unless data.allow_outside_paths."""
    if isinstance(value, dict):
        if isinstance(value.get("path"), str) and value["path"].strip():
            value = value["path"]
        elif "bytes" in value:
            raise loc.err("inline_data", fld, f"the {kind} is given as inline bytes",
                          "save it to a file and give its path instead")
        else:
            raise loc.err("bad_media", fld, f"the {kind} entry is an object without a 'path'",
                          "give the file path as a string")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else _type_name(value)
        raise loc.err("bad_media", fld, f"the {kind} path is {what}",
                      "give the file path as a non-empty string")
    v = value.strip()
    low = v.lower()
    if low.startswith("data:"):
        raise loc.err("inline_data", fld, f"the {kind} is inline base64 data (a data: URL)",
                      "save it to a file and give its local path instead")
    if low.startswith("file:"):
        v = _file_url_to_path(v)
    elif _SCHEME_RE.match(v):
        raise loc.err("remote_url", fld,
                      f"remote URL '{v[:120]}' is not supported: conversion never downloads files",
                      "download the file and give its local path (relative to the dataset file, "
                      "or to --media-root)")
    p = Path(v).expanduser()
    if not p.is_absolute():
        rel, p = p, Path(base) / p
        if check_files and not os.path.exists(p):
            p = _found_under(Path(base), rel) or p
    full = os.path.abspath(p)
    if within is not None and _outside(full, within):
        raise loc.err("outside_path", fld,
                      f"path '{value}' resolves to '{Path(full).resolve()}', outside the dataset folder "
                      f"'{Path(within).resolve()}'",
                      "move the file under the dataset folder, or set data.allow_outside_paths: true")
    if check_files and not os.path.exists(full):
        raise loc.err("missing_file", fld, f"{kind} file '{value}' does not exist (looked for {full})",
                      f"check the path; relative paths are resolved against {os.path.abspath(base)} "
                      "(change that with --media-root)")
    return full


def _media_part(kind: str, value: Any, loc: _Loc, fld: str, base: Path, check_files: bool,
                within: Path | None = None) -> dict:
    if kind == "video" and isinstance(value, list):
        if not value:
            raise loc.err("bad_media", fld, "the video's frame list is empty",
                          "list the frame images in order, or give a folder / video file")
        frames = [_media_path(f, loc, f"{fld}[{k}]", "video frame", base, check_files, within)
                  for k, f in enumerate(value)]
        return {"type": "video", "frames": frames}
    return {"type": kind, "path": _media_path(value, loc, fld, kind, base, check_files, within)}


# --------------------------------------------------------------------------- placeholders


def _tagged_parts(text: str, role: str, media: dict[str, list[dict]], loc: _Loc, fld: str) -> list[dict]:
    """Split ``text`` at ``<image>``/``<audio>``/``<video>`` and put the next file of each kind there.

    Whitespace next to a placeholder is dropped ("<image>\\nQuestion" gives an
    image part then "Question"); whitespace-only pieces disappear.
    """
    pieces = _TAG_RE.split(text)  # text, kind, text, kind, ..., text
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 1:
            if role != "user":
                raise loc.err("media_not_allowed", fld, f"a <{piece}> placeholder in a {role} turn",
                              "media can only go in user turns; move the placeholder to the user "
                              "message before it")
            parts.append(media[piece].pop(0))
            continue
        if k > 0:
            piece = piece.lstrip()
        if k < len(pieces) - 1:
            piece = piece.rstrip()
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _count_tags(messages: list[dict]) -> Counter:
    counts: Counter = Counter()
    for m in messages:
        if isinstance(m.get("content"), str):
            counts.update(_TAG_RE.findall(m["content"]))
    return counts


# --------------------------------------------------------------------------- roles


def _map_role(raw: Any, loc: _Loc, fld: str, table: dict[str, str], role_map: dict[str, str] | None,
              accepted: str) -> str:
    if isinstance(raw, str):
        if role_map and raw in role_map:
            return role_map[raw]
        if raw in table:
            return table[raw]
        if raw.lower() in _TOOL_ROLES:
            raise loc.err("unsupported_role", fld,
                          f"role {json.dumps(raw)} (a tool-calling turn) is not supported",
                          "drop tool/function turns from the data, or map the role with "
                          "--role NAME=user|assistant")
    guess = _did_you_mean(raw, table) if isinstance(raw, str) else ""
    raise loc.err("unknown_role", fld, f"unknown role {json.dumps(raw)}",
                  f"{guess}use one of: {accepted}; or map it with --role NAME=user|assistant|system")


# --------------------------------------------------------------------------- LLaMA-Factory / ms-swift


def _pairs_messages(obj: dict, loc: _Loc, prompt: str, reply: str, history_key: str) -> list[dict]:
    """alpaca (instruction/input/output) or swift (query/response) + history pairs -> messages."""
    msgs: list[dict] = []
    history = obj.get(history_key) or []
    if not isinstance(history, list):
        raise loc.err("bad_history", history_key, f"'{history_key}' is {_type_name(history)}, not a list",
                      f"write '{history_key}' as a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, str) for x in pair)):
            raise loc.err("bad_history", f"{history_key}[{i}]", "the entry is not a [user, assistant] pair of strings",
                          "write each history entry as [\"question\", \"answer\"]")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    for key in (prompt, reply):
        if not isinstance(obj.get(key), str):
            raise loc.err("bad_content", key, f"'{key}' is {_type_name(obj.get(key))}, not a string",
                          f"give '{key}' as a string")
    user = obj[prompt]
    if prompt == "instruction" and isinstance(obj.get("input"), str) and obj["input"].strip():
        user = f"{user}\n{obj['input']}"  # as LLaMA-Factory joins them
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": obj[reply]}]
    return msgs


def _convert_tagged(obj: Any, loc: _Loc, *, base: Path, check_files: bool, role_map, swift: bool,
                    within: Path | None = None) -> dict:
    """A LLaMA-Factory (``swift=False``) or ms-swift (``swift=True``) record -> our sample."""
    if not isinstance(obj, dict):
        raise loc.err("not_object", "", f"the record is {_type_name(obj)}, not an object",
                      'write each record as {"messages": [...], "images": [...]}')
    if not swift and _is_v1(obj):
        return _convert_v1(obj, loc, base=base, check_files=check_files, role_map=role_map, within=within)
    accepted = "user, assistant, system (or human, gpt with 'conversations')"
    if "messages" in obj or "conversations" in obj:
        key = "messages" if "messages" in obj else "conversations"
        raw_msgs = obj[key]
        if not isinstance(raw_msgs, list) or not raw_msgs:
            raise loc.err("bad_messages", key, f"'{key}' is {_type_name(raw_msgs) if raw_msgs != [] else 'empty'}",
                          f"make '{key}' a non-empty list of turns")
        msgs = []
        for i, m in enumerate(raw_msgs):
            mfld = f"{key}[{i}]"
            if not isinstance(m, dict):
                raise loc.err("bad_message", mfld, f"the turn is {_type_name(m)}, not an object",
                              'write turns as {"role": ..., "content": ...} or {"from": ..., "value": ...}')
            rkey = "role" if "role" in m else "from"
            ckey = "content" if "content" in m else "value"
            if rkey not in m:
                raise loc.err("missing_role", mfld, "the turn has no 'role' (or 'from')",
                              f"add \"role\": one of {accepted}")
            role = _map_role(m[rkey], loc, f"{mfld}.{rkey}", _ROLES, role_map, accepted)
            content = m.get(ckey)
            if isinstance(content, list):
                raise loc.err("bad_content", f"{mfld}.{ckey}",
                              "the content is a list of parts, not a string with <image> placeholders",
                              "write each turn as a string with <image>/<audio>/<video> placeholders")
            if not isinstance(content, str):
                raise loc.err("bad_content", f"{mfld}.{ckey}",
                              f"the content is {_type_name(content)}, not a string",
                              "give each turn's text as a string")
            msgs.append({"role": role, "content": content})
    elif "instruction" in obj and "output" in obj:
        msgs = _pairs_messages(obj, loc, "instruction", "output", "history")
    elif "query" in obj and "response" in obj:
        msgs = _pairs_messages(obj, loc, "query", "response", "history")
    else:
        raise loc.err("missing_messages", "messages",
                      "the record has no 'messages', 'conversations', 'instruction'/'output' or "
                      "'query'/'response'",
                      "add \"messages\": [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]")

    system = obj.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise loc.err("bad_content", "system", f"'system' is {_type_name(system)}, not a string",
                          "give the system prompt as a string")
        if msgs and msgs[0]["role"] == "system":
            raise loc.err("bad_messages", "system",
                          "the system prompt is given twice (the 'system' column and a system turn)",
                          "keep one of them")
        msgs.insert(0, {"role": "system", "content": system})

    # Media columns, resolved to parts, checked against the placeholders.
    tags = _count_tags(msgs)
    media: dict[str, list[dict]] = {}
    for kind, col in _MEDIA_COLUMN.items():
        values = obj.get(col)
        if values is None:
            values = []
        elif isinstance(values, (str, dict)):
            values = [values]
        elif not isinstance(values, list):
            raise loc.err("bad_media", col, f"'{col}' is {_type_name(values)}, not a list",
                          f"write '{col}' as a list of file paths")
        media[kind] = [_media_part(kind, v, loc, f"{col}[{k}]", base, check_files, within)
                       for k, v in enumerate(values)]
        n_tags, n_files = tags.get(kind, 0), len(values)
        if swift and n_tags < n_files:
            # ms-swift adds the missing placeholders at the start of the first user turn.
            first = next((m for m in msgs if m["role"] == "user"), None)
            if first is not None:
                first["content"] = f"<{kind}>" * (n_files - n_tags) + first["content"]
                n_tags = n_files
        if n_tags != n_files:
            more = "more" if n_tags > n_files else "fewer"
            raise loc.err(
                "placeholder_mismatch", col,
                f"{n_tags} <{kind}> placeholder{'s' if n_tags != 1 else ''} in the text but "
                f"{n_files} entr{'ies' if n_files != 1 else 'y'} in '{col}' ({more} placeholders than files)",
                f"put exactly one <{kind}> in the text where each file of '{col}' belongs, in order, "
                f"or fix the '{col}' list")

    messages = []
    for i, m in enumerate(msgs):
        content: Any = m["content"]
        if _TAG_RE.search(content):
            content = _tagged_parts(content, m["role"], media, loc, f"messages[{i}].content")
            if not content:
                raise loc.err("empty", f"messages[{i}].content", "the turn is empty",
                              "write the turn's text, or remove the turn")
        messages.append({"role": m["role"], "content": content})
    return _finish(obj, messages, loc)


# --------------------------------------------------------------------------- LLaMA-Factory v1

# LLaMA-Factory v1 (its src/llamafactory/v1): every turn's content is a list of {"type", "value"}
# parts, and a turn may carry a loss_weight (default 1). Only assistant turns are ever learned there,
# one prefix per learned turn, so a 0 on an assistant turn keeps it as context and turns after the
# last learned one teach nothing.
_V1_MEDIA = {"image_url": "image", "audio_url": "audio", "video_url": "video"}
_V1_PART_TYPES = ("text", "reasoning", "tool_call", *_V1_MEDIA)


def _is_v1(obj: Any) -> bool:
    """A LLaMA-Factory v1 record: `messages` whose parts carry `value`, or turns with `loss_weight`."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list):
        return False
    for m in msgs:
        if not isinstance(m, dict):
            continue
        if "loss_weight" in m:
            return True
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and "value" in p and p.get("type") in _V1_PART_TYPES
                                             for p in content):
            return True
    return False


def _v1_loss(m: dict, role: str, loc: _Loc, fld: str) -> bool:
    """Whether a v1 turn is learned: its loss_weight, which our loss (no per-turn weights) takes as 0 or 1."""
    if "loss_weight" not in m:
        return role == "assistant"
    w = m["loss_weight"]
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise loc.err("bad_loss_weight", fld, f"'loss_weight' is {_type_name(w)}, not a number",
                      "use 0 or 1: 0 keeps the turn as context without learning it, 1 learns it")
    if role == "assistant" and w not in (0, 1):
        raise loc.err("bad_loss_weight", fld, f"loss_weight {w} on an assistant turn: the loss here has no "
                      "per-turn weights", "use 0 or 1: 0 keeps the turn as context without learning it, 1 learns it")
    return role == "assistant" and w == 1


def _convert_v1(obj: dict, loc: _Loc, *, base: Path, check_files: bool, role_map, within: Path | None = None) -> dict:
    """A LLaMA-Factory v1 record -> our sample (loss_weight 0 on an answer -> "loss": false)."""
    raw_msgs = obj["messages"]
    if not raw_msgs:
        raise loc.err("bad_messages", "messages", "'messages' is empty", "make 'messages' a non-empty list of turns")
    accepted = "system, user, assistant"
    turns: list[tuple[str, list[dict], bool]] = []
    for i, m in enumerate(raw_msgs):
        mfld = f"messages[{i}]"
        if not isinstance(m, dict):
            raise loc.err("bad_message", mfld, f"the turn is {_type_name(m)}, not an object",
                          'write turns as {"role": ..., "content": [{"type": "text", "value": ...}]}')
        role = _map_role(m.get("role"), loc, f"{mfld}.role", _ROLES, role_map, accepted)
        learned = _v1_loss(m, role, loc, f"{mfld}.loss_weight")
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "value": content}]
        if not isinstance(content, list):
            raise loc.err("bad_content", f"{mfld}.content",
                          f"the content is {_type_name(content)}, not a list of parts",
                          'write [{"type": "text", "value": "..."}, {"type": "image_url", "value": "img.png"}]')
        parts = []
        for j, p in enumerate(content):
            pfld = f"{mfld}.content[{j}]"
            if not isinstance(p, dict):
                raise loc.err("bad_part", pfld, f"the part is {_type_name(p)}, not an object",
                              'write parts as {"type": "text", "value": "..."}')
            ptype = p.get("type")
            if ptype in ("reasoning", "tool_call"):
                raise loc.err("unsupported_part", f"{pfld}.type", f"a {ptype} part is not supported",
                              "drop it, or write it into the turn's text" if ptype == "reasoning"
                              else "drop tool-calling turns from the data")
            if ptype not in ("text", *_V1_MEDIA):
                raise loc.err("unknown_part_type", f"{pfld}.type", f"unknown part type {json.dumps(ptype)}",
                              f"{_did_you_mean(ptype, _V1_PART_TYPES)}use text, image_url, audio_url or video_url")
            if "value" not in p:
                raise loc.err("bad_part" if ptype == "text" else "missing_path", f"{pfld}.value",
                              f"the {ptype} part has no 'value'",
                              'give the text as "value"' if ptype == "text" else 'give the file path as "value"')
            if ptype == "text":
                if not isinstance(p["value"], str):
                    raise loc.err("bad_part", f"{pfld}.value", f"the text is {_type_name(p['value'])}, not a string",
                                  'give the text as a string: {"type": "text", "value": "..."}')
                parts.append({"type": "text", "text": p["value"]})
                continue
            if role != "user":
                raise loc.err("media_not_allowed", pfld, f"a {ptype} part in a {role} turn",
                              "media can only go in user turns")
            parts.append(_media_part(_V1_MEDIA[ptype], p["value"], loc, f"{pfld}.value", base, check_files, within))
        turns.append((role, parts, learned))

    learned_at = [i for i, (role, _, learned) in enumerate(turns) if learned]
    if not learned_at:
        raise loc.err("no_loss", "messages", "no assistant turn has loss_weight 1, so the sample teaches nothing",
                      "set loss_weight 1 on the answer to learn, or remove the sample")
    messages = []
    for role, parts, learned in turns[:learned_at[-1] + 1]:
        if role == "user" and not (len(parts) == 1 and parts[0]["type"] == "text"):
            messages.append({"role": role, "content": parts})
            continue
        msg = {"role": role, "content": "".join(p["text"] for p in parts)}
        if role == "assistant" and not learned:
            msg["loss"] = False
        messages.append(msg)
    return _finish(obj, messages, loc)


# --------------------------------------------------------------------------- OpenAI


def _looks_like_path(value: str) -> bool:
    # Base64 never contains '.', so a '.' (file extension) or a URL scheme marks a path.
    return "." in value or value.lower().startswith("file:") or bool(_SCHEME_RE.match(value))


def _openai_ref(part: dict, key: str, loc: _Loc, fld: str) -> Any:
    value = part.get(key)
    if isinstance(value, dict):
        for k in ("url", "path", "file"):
            if k in value:
                return value[k]
        if "data" in value:
            data = value["data"]
            if isinstance(data, str) and _looks_like_path(data):
                return data
            raise loc.err("inline_data", f"{fld}.{key}.data", "inline base64 audio is not supported",
                          "save the audio to a file and give its local path, e.g. "
                          "{\"type\": \"input_audio\", \"input_audio\": {\"path\": \"audio/a.wav\"}}")
        raise loc.err("missing_path", f"{fld}.{key}", f"'{key}' has no 'url' or 'path'",
                      f"give the local file as {{\"{key}\": {{\"url\": \"file:///abs/or/rel/path\"}}}}")
    if value is None:
        raise loc.err("missing_path", fld, f"the part has no '{key}'",
                      f"add \"{key}\": {{\"url\": \"file:///path\"}} (a local file)")
    return value


def _convert_openai(obj: Any, loc: _Loc, *, base: Path, check_files: bool, role_map,
                    within: Path | None = None) -> dict:
    if not isinstance(obj, dict):
        raise loc.err("not_object", "", f"the record is {_type_name(obj)}, not an object",
                      'write each record as {"messages": [...]}')
    raw_msgs = obj.get("messages")
    if not isinstance(raw_msgs, list) or not raw_msgs:
        other = next((k for k in ("conversations", "query", "instruction") if k in obj), None)
        problem = (f"the record has '{other}' and no 'messages' list" if other
                   else "the record has no non-empty 'messages' list")
        raise loc.err("missing_messages", "messages", problem,
                      'add "messages": [{"role": "user", ...}, {"role": "assistant", ...}]')
    column = next((c for c in _MEDIA_COLUMN.values() if obj.get(c)), None)
    if column:
        # OpenAI records carry media in their parts; a column's files would be left out
        raise loc.err("media_column", column, f"the record has an '{column}' column, which OpenAI chat "
                      "records do not have", f"put the files in image_url/input_audio parts, or drop '{column}'")
    accepted = "system, developer, user, assistant"
    messages = []
    for i, m in enumerate(raw_msgs):
        mfld = f"messages[{i}]"
        if not isinstance(m, dict):
            raise loc.err("bad_message", mfld, f"the message is {_type_name(m)}, not an object",
                          'write messages as {"role": ..., "content": ...}')
        role = _map_role(m.get("role"), loc, f"{mfld}.role", _OPENAI_ROLES, role_map, accepted)
        content = m.get("content")
        cfld = f"{mfld}.content"
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            fix = ("tool calls are not supported; drop the turn" if m.get("tool_calls")
                   else "give the content as a string or a list of parts")
            raise loc.err("bad_content", cfld, f"the content is {_type_name(content)}", fix)
        parts = []
        for j, p in enumerate(content):
            pfld = f"{cfld}[{j}]"
            if isinstance(p, str):
                parts.append({"type": "text", "text": p})
                continue
            if not isinstance(p, dict):
                raise loc.err("bad_part", pfld, f"the part is {_type_name(p)}, not an object",
                              'write parts as {"type": "text", "text": ...}')
            ptype = p.get("type")
            if ptype in ("text", "input_text", "output_text"):
                if not isinstance(p.get("text"), str):
                    raise loc.err("bad_part", f"{pfld}.text", "the text part has no string 'text'",
                                  'write {"type": "text", "text": "..."}')
                parts.append({"type": "text", "text": p["text"]})
                continue
            if ptype in ("image_url", "input_image"):
                kind, ref = "image", _openai_ref(p, "image_url", loc, pfld)
            elif ptype in ("input_audio", "audio_url"):
                kind, ref = "audio", _openai_ref(p, ptype, loc, pfld)
            elif ptype == "video_url":
                kind, ref = "video", _openai_ref(p, "video_url", loc, pfld)
            elif ptype in MEDIA_TYPES:  # our own part style mixed in
                kind = ptype
                ref = p.get("frames") if ptype == "video" and "frames" in p else p.get("path")
            else:
                raise loc.err("unknown_part_type", f"{pfld}.type", f"unsupported part type {json.dumps(ptype)}",
                              "use text, image_url, input_audio, audio_url or video_url parts")
            if role != "user":
                raise loc.err("media_not_allowed", pfld, f"a {kind} part in a {role} turn",
                              "media can only go in user turns")
            parts.append(_media_part(kind, ref, loc, pfld, base, check_files, within))
        if role != "user":
            # System and assistant content is text only: join the text parts.
            messages.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            messages.append({"role": role, "content": parts})
    return _finish(obj, messages, loc)


# --------------------------------------------------------------------------- ours


def sample_to_dict(sample: Sample) -> dict:
    """A parsed :class:`Sample` back to a JSON object (media paths absolute)."""
    messages = []
    for m in sample.messages:
        if len(m.parts) == 1 and m.parts[0].type == "text" and not m.parts[0].extra:
            messages.append({"role": m.role, "content": m.parts[0].text, **({} if m.loss else {"loss": False})})
            continue
        parts = []
        for p in m.parts:
            if p.type == "text":
                parts.append({"type": "text", "text": p.text, **p.extra})
            elif p.frames is not None:
                parts.append({"type": p.type, "frames": [str(f) for f in p.frames], **p.extra})
            else:
                parts.append({"type": p.type, "path": str(p.path), **p.extra})
        messages.append({"role": m.role, "content": parts, **({} if m.loss else {"loss": False})})
    out: dict[str, Any] = {}
    if sample.id is not None:
        out["id"] = sample.id
    if sample.task is not None:
        out["task"] = sample.task
    out["messages"] = messages
    if sample.answer is not None:
        out["answer"] = sample.answer
    out.update(sample.meta)
    return out


def _convert_ours(obj: Any, loc: _Loc, *, base: Path, check_files: bool, role_map,
                  within: Path | None = None) -> dict:
    other = _classify(obj)
    if other == "preference":
        raise loc.err("preference_data", "", f"the record is preference data ({_preference_form(obj)})",
                      _PREFERENCE_FIX)
    if other not in (None, "ours"):
        # our parser would keep another format's media columns as plain metadata and lose the files
        raise loc.err("other_format", "", "the record is not in our format",
                      f"it looks like {_FORMAT_NAMES[other]}, which --from {other} reads")
    try:
        sample = parse_sample(obj, source=loc.file, line=loc.line, base_dir=base,
                              allow_outside_paths=within is None, check_files=check_files)
    except DataError as e:
        raise loc.relocate(e) from None
    return sample_to_dict(sample)


def _finish(obj: dict, messages: list[dict], loc: _Loc) -> dict:
    """Add the pass-through keys (id, task, answer) and validate the result."""
    out: dict[str, Any] = {}
    for key in ("id", "task"):
        if obj.get(key) is not None:
            out[key] = obj[key]
    out["messages"] = messages
    if obj.get("answer") is not None:
        out["answer"] = obj["answer"]
    _validate(out, loc)
    return out


def _validate(sample: dict, loc: _Loc) -> None:
    try:
        parse_sample(sample, source=loc.file, line=loc.line, base_dir=Path(os.sep),
                     allow_outside_paths=True, check_files=False)
    except DataError as e:
        raise loc.relocate(e) from None


# --------------------------------------------------------------------------- detection

_FORMAT_NAMES = {
    "ours": "our JSONL format",
    "llamafactory": "LLaMA-Factory's format (sharegpt/alpaca with <image> placeholders, or v1 parts with 'value')",
    "swift": "ms-swift's format (media columns without placeholders, or query/response)",
    "openai": "OpenAI's chat format (image_url/input_audio parts)",
}

_PREFERENCE_FIX = ("preference training (train.method: dpo) is not available yet (planned: issue 29); supervised "
                   "fine-tuning takes chat samples whose answers are all to be learned")


def _preference_form(obj: Any) -> str | None:
    """The preference form a record is in (answers ranked, not one answer to learn), or None."""
    if not isinstance(obj, dict):
        return None
    if "chosen_messages" in obj and "rejected_messages" in obj:
        return "LLaMA-Factory v1: chosen_messages + rejected_messages"
    if "rejected_response" in obj:
        return "ms-swift: rejected_response"
    if "kto_tag" in obj or ("messages" in obj and isinstance(obj.get("label"), bool)):
        # desirable/undesirable answers: supervised fine-tuning would learn the undesirable ones too
        return f"KTO feedback: {'kto_tag' if 'kto_tag' in obj else 'messages + label true/false'}"
    if "chosen" in obj and "rejected" in obj:
        for key, form in (("conversations", "LLaMA-Factory sharegpt ranking: conversations + chosen + rejected"),
                          ("instruction", "LLaMA-Factory alpaca ranking: instruction + chosen + rejected"),
                          ("messages", "messages + chosen + rejected"),
                          ("prompt", "prompt + chosen + rejected")):
            if key in obj:
                return form
        return "chosen + rejected"
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and {"chosen", "rejected"} <= set(msgs[-1]):
        return "a last turn with chosen + rejected"
    return None


def _preference_error(head: list[tuple[_Loc, Any]], source: str) -> DataError | None:
    """One error for a file whose first records are mostly preference data (instead of one per record)."""
    records = [obj for _, obj in head if not isinstance(obj, DataError)]
    forms = [f for f in map(_preference_form, records) if f]
    if not forms or 2 * len(forms) <= len(records):
        return None
    return DataError("preference_data", f"the file holds preference data ({forms[0]}), not chat samples for "
                     "supervised fine-tuning", _PREFERENCE_FIX, file=source)


def _classify(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if _preference_form(obj):
        return "preference"
    if "conversations" in obj or ("instruction" in obj and "output" in obj):
        return "llamafactory"
    if "query" in obj and "response" in obj:
        return "swift"
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return None
    if _is_v1(obj):
        return "llamafactory"
    types = {p.get("type") for m in msgs if isinstance(m, dict) and isinstance(m.get("content"), list)
             for p in m["content"] if isinstance(p, dict)}
    if types & set(_OPENAI_PART_TYPES):
        return "openai"
    media_cols = [c for c in _MEDIA_COLUMN.values() if obj.get(c)]
    tagged = any(isinstance(m, dict) and isinstance(m.get("content"), str) and _TAG_RE.search(m["content"])
                 for m in msgs)
    if media_cols or tagged:
        # Only ms-swift accepts media without any placeholder; a partial mismatch is
        # left to the LLaMA-Factory converter, which reports it.
        return "llamafactory" if tagged else "swift"
    if any(isinstance(m, dict) and "from" in m and "role" not in m for m in msgs):
        return "llamafactory"
    if types and not types <= set(PART_TYPES):
        return None
    return "ours"


def _detect(head: list[tuple[_Loc, Any]], source: str) -> str:
    records = [obj for _, obj in head if not isinstance(obj, DataError)]
    votes = Counter(map(_classify, records))
    for fmt in ("openai", "swift", "llamafactory", "ours"):
        if votes[fmt]:
            return fmt
    n = len(records)
    raise DataError("unknown_format",
                    f"could not recognise the format from the first {n} record{'s' if n != 1 else ''}",
                    "pass --from llamafactory|swift|openai|ours, or --template for a table", file=source)


def _head(records: Iterator[tuple[_Loc, Any]], n: int) -> list[tuple[_Loc, Any]]:
    """The first `n` records that parsed (and the broken ones among them)."""
    head, good = [], 0
    for loc, obj in records:
        head.append((loc, obj))
        good += not isinstance(obj, DataError)
        if good >= n:
            break
    return head


def detect_format(path: str | os.PathLike, *, max_records: int = 50) -> str:
    """``"ours"``, ``"llamafactory"``, ``"swift"`` or ``"openai"``, judged from the first records.

    Text-only chat records are valid in every format and are reported as
    ``"ours"``; LLaMA-Factory's v1 records and `dataset_info.json#name` are ``"llamafactory"``.
    Raises :class:`DataError` when no record matches any format.
    """
    if dataset_ref(path):
        return "llamafactory"
    return _detect(_head(_read_records(Path(path)), max_records), str(path))


def dominant_format(path: str | os.PathLike, *, max_records: int = 200) -> str:
    """The format most of the first records are in ("ours" on a tie or when nothing matches;
    "preference" for preference data).

    Unlike `detect_format`, one odd record does not decide: a broken line of our own format
    (say, with ShareGPT 'conversations') is then reported as broken, not reinterpreted.
    """
    votes: Counter = Counter()
    try:
        for k, (_, obj) in enumerate(_read_records(Path(path))):
            if k >= max_records:
                break
            if not isinstance(obj, DataError):
                votes[_classify(obj) or "unknown"] += 1
    except (DataError, ValueError, OSError):
        return "ours"
    others = {f: n for f, n in votes.items() if f not in ("ours", "unknown")}
    if others and sum(others.values()) > votes["ours"]:
        return max(others, key=others.get)
    return "ours"


# --------------------------------------------------------------------------- LLaMA-Factory dataset_info.json

# A dataset named as LLaMA-Factory names it: `folder/dataset_info.json#name`. Its entry gives
# file_name (a file or a folder of files, relative to the info's folder), formatting (alpaca,
# sharegpt; openai is sharegpt with role/content tags), columns and tags. LLaMA-Factory opens media
# relative to its media_dir, which defaults to the folder of dataset_info.json (its dataset_dir).
_INFO_NAME = "dataset_info.json"
_INFO_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_INFO_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                 "messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
                 "audios": None, "chosen": None, "rejected": None, "kto_tag": None}
_INFO_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
              "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


def dataset_ref(path: str | os.PathLike) -> tuple[Path, str] | None:
    """(the dataset_info.json, the dataset's name) of `folder/dataset_info.json#name`, else None."""
    text = os.fspath(path)
    file, sep, name = text.rpartition("#")
    if not sep or not file.lower().endswith(".json") or os.path.exists(text):
        return None
    return Path(file).expanduser(), name


@dataclass
class _InfoEntry:
    name: str
    files: list[Path]
    formatting: str
    columns: dict
    tags: dict


def _read_info(info: Path) -> dict:
    def bad(problem: str, fix: str) -> DataError:
        return DataError("dataset_info", problem, fix, file=str(info))

    if not info.is_file():
        raise bad("the file does not exist", "check the path before '#'")
    try:
        data = json.loads(info.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the file is not valid JSON ({e})", "fix the JSON") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise bad("the file is not a JSON object of dataset entries", 'write {"name": {"file_name": ...}, ...}')
    return data


def _names(data: dict, limit: int = 12) -> str:
    names = list(data)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _info_entry(info: Path, name: str, allow_outside_paths: bool = True) -> _InfoEntry:
    data = _read_info(info)
    if name not in data:
        raise DataError("dataset_info", f"no dataset named '{name}'",
                        f"{_did_you_mean(name, data)}name one of: {_names(data)}", file=str(info))

    def bad(problem: str, fix: str, kind: str = "dataset_info") -> DataError:
        return DataError(kind, problem, fix, file=str(info), field=name)

    entry = data[name]
    remote = next((k for k in _INFO_REMOTE if k in entry), None)
    if remote:
        fix = (f"nothing is downloaded through dataset_info.json: use data.train: {{hub: {entry[remote]}}}"
               if remote == "hf_hub_url" else "download it and name the file in file_name")
        raise bad(f"the dataset loads from {remote} ({entry[remote]})", fix)
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise bad("'columns' and 'tags' must be objects", 'write "columns": {"messages": "conversations", ...}')
    # as LLaMA-Factory reads it: with "columns" given, a column it does not name is not read
    columns = {k: (columns.get(k) if "columns" in entry else v) for k, v in _INFO_COLUMNS.items()}
    if entry.get("ranking") or columns["kto_tag"]:
        form = "ranking: true" if entry.get("ranking") else "KTO feedback: kto_tag"
        raise bad(f"the dataset is preference data ({form}), not chat samples for supervised fine-tuning",
                  _PREFERENCE_FIX, "preference_data")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise bad(f"unknown formatting {json.dumps(formatting)}", "use alpaca or sharegpt")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise bad("the entry has no file_name", "name the dataset's file (relative to dataset_info.json's folder)")
    target = info.parent / file_name
    if not allow_outside_paths and _outside(str(target), info.parent):
        raise bad(f"file_name '{file_name}' resolves to '{target.resolve()}', outside the dataset folder "
                  f"'{info.parent.resolve()}'", "move the file under the folder of dataset_info.json, or set "
                  "data.allow_outside_paths: true", "outside_path")
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
    elif target.is_file():
        files = [target]
    else:
        raise bad(f"file_name '{file_name}' does not exist (looked for {target})", "fix file_name")
    other = [p.name for p in files if p.suffix.lower() not in (".json", ".jsonl")]
    if other or not files:
        raise bad(f"file_name '{file_name}' holds {', '.join(other[:3]) or 'no files'}: JSON and JSONL files are "
                  "read here", "convert the data to JSON lines (a Parquet file goes directly in data.train, "
                  "with columns)")
    return _InfoEntry(name, files, formatting, columns, {**_INFO_TAGS, **tags})


def _info_record(obj: Any, e: _InfoEntry, loc: _Loc) -> Any:
    """A record of an entry's file, with its columns and tags renamed to those the LLaMA-Factory
    converter reads (alpaca's instruction/input/output, or role/content messages)."""
    if not isinstance(obj, dict):
        return obj
    c, out = e.columns, {}
    where = f"of the dataset_info.json entry '{e.name}'"
    if e.formatting == "alpaca":
        for key, ours in (("prompt", "instruction"), ("query", "input"), ("response", "output"),
                          ("history", "history")):
            if c[key] and c[key] in obj:
                out[ours] = obj[c[key]]
        for key, ours in (("prompt", "instruction"), ("response", "output")):
            if not isinstance(out.get(ours), str):
                raise loc.err("missing_column", c[key] or key, f"the record has no text in column '{c[key]}' "
                              f"(columns.{key} {where})", f"fix columns.{key} in dataset_info.json, or the record")
    else:
        turns = obj.get(c["messages"]) if c["messages"] else None
        if not isinstance(turns, list):
            raise loc.err("missing_messages", c["messages"] or "messages", f"the record has no list in column "
                          f"'{c['messages']}' (columns.messages {where})",
                          "fix columns.messages in dataset_info.json, or the record")
        t = e.tags
        roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system",
                 t["observation_tag"]: "observation", t["function_tag"]: "function_call"}
        out["messages"] = [{"role": roles.get(m.get(t["role_tag"]), m.get(t["role_tag"])),
                            "content": m.get(t["content_tag"])} if isinstance(m, dict) else m for m in turns]
    if c["system"] and obj.get(c["system"]) not in (None, ""):
        out["system"] = obj[c["system"]]
    for col in _MEDIA_COLUMN.values():
        if c[col] and obj.get(c[col]) is not None:
            out[col] = obj[c[col]]
    out.update({k: obj[k] for k in ("id", "task", "answer") if k in obj})
    return out


def _dataset_info_error(info: Path) -> DataError:
    names = list(_read_info(info))
    return DataError("dataset_info", "this is LLaMA-Factory's list of datasets, not a dataset",
                     f"name one of its datasets after '#', e.g. {info}#{names[0] if names else 'name'} "
                     f"(datasets: {_names(dict.fromkeys(names))})", file=str(info))


# --------------------------------------------------------------------------- file conversion


_CONVERTERS = {
    "ours": _convert_ours,
    "openai": _convert_openai,
    "llamafactory": lambda obj, loc, **kw: _convert_tagged(obj, loc, swift=False, **kw),
    "swift": lambda obj, loc, **kw: _convert_tagged(obj, loc, swift=True, **kw),
}


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


def _hinted(e: DataError, obj: Any, loc: _Loc, fmt: str, kw: dict) -> DataError:
    """A converter's error on a record of another format, with the `--from` that reads it (only one
    that does: a suggestion never leads to another refusal) or, for preference data, what to do."""
    other = _classify(obj)
    if other == "preference":
        fix = f"the record is preference data ({_preference_form(obj)}); {_PREFERENCE_FIX}"
    elif other in _CONVERTERS and other != fmt:
        try:
            _CONVERTERS[other](obj, loc, **kw)
        except DataError:
            return e
        fix = f"the record is in {_FORMAT_NAMES[other]}: convert it with --from {other}"
    else:
        return e
    return DataError(e.kind, e.problem, fix, file=e.file, line=e.line, field=e.field)


def _convert_records(result: ConvertResult, records, convert, fmt: str | None, on_error: str, kw: dict) -> None:
    for loc, obj in records:
        def make(obj=obj, loc=loc):
            try:
                return convert(obj, loc, **kw)
            except DataError as e:
                raise (_hinted(e, obj, loc, fmt, kw) if fmt else e) from None

        result.add(loc, obj, make, on_error)


def convert_file(
    src: str | os.PathLike,
    fmt: str = "auto",
    *,
    media_root: str | os.PathLike | None = None,
    on_error: str = "raise",
    check_files: bool = True,
    role_map: dict[str, str] | None = None,
    allow_outside_paths: bool = True,
) -> ConvertResult:
    """Convert a LLaMA-Factory / ms-swift / OpenAI / our-format file into samples in memory.

    `src` may name a dataset of a LLaMA-Factory `dataset_info.json` as `path/dataset_info.json#name`.
    Media paths are resolved against ``media_root`` (default: the file's
    folder; the info's folder for a dataset_info.json entry) and returned absolute;
    :func:`write_jsonl` makes them relative. Unless ``allow_outside_paths``, every media file must
    lie inside that folder, as for our JSONL. ``role_map`` maps extra role names to ours
    (``{"doctor": "assistant"}``). Preference data is refused with one error for the file.
    """
    _check_on_error(on_error)
    if fmt != "auto" and fmt not in _CONVERTERS:
        raise ConfigError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or 'auto'")
    if role_map:
        bad = {k: v for k, v in role_map.items() if v not in ("user", "assistant", "system")}
        if bad:
            raise ConfigError(f"role_map targets must be user, assistant or system, not {bad}")
    ref = dataset_ref(src)
    if ref:
        if fmt not in ("auto", "llamafactory"):
            raise ConfigError(f"{src} names a LLaMA-Factory dataset: read it with --from llamafactory (or auto)")
        return _convert_dataset_info(*ref, media_root=media_root, on_error=on_error, check_files=check_files,
                                     role_map=role_map, allow_outside_paths=allow_outside_paths)
    src = Path(src)
    if src.name == _INFO_NAME and src.is_file():
        raise _dataset_info_error(src)
    records = _read_records(src)
    head = _head(records, 50)
    problem = _preference_error(head, str(src))
    if problem:
        raise problem
    if fmt == "auto":
        fmt = _detect(head, str(src))
    base = Path(media_root) if media_root is not None else src.parent
    kw = dict(base=base, check_files=check_files, role_map=role_map,
              within=None if allow_outside_paths else src.parent)
    result = ConvertResult(source=str(src), format=fmt)
    _convert_records(result, itertools.chain(head, records), _CONVERTERS[fmt], fmt, on_error, kw)
    if result.n_records == 0:
        raise DataError("empty", "the file has no records", "add records to the file", file=str(src))
    return result


def _convert_dataset_info(info: Path, name: str, *, media_root, on_error: str, check_files: bool, role_map,
                          allow_outside_paths: bool) -> ConvertResult:
    entry = _info_entry(info, name, allow_outside_paths)
    base = Path(media_root) if media_root is not None else info.parent
    kw = dict(base=base, check_files=check_files, role_map=role_map, swift=False,
              within=None if allow_outside_paths else info.parent)
    result = ConvertResult(source=f"{info}#{name}", format="llamafactory")
    for file in entry.files:
        records = _read_records(file)
        head = _head(records, 50)
        problem = _preference_error(head, str(file))
        if problem:
            raise problem
        _convert_records(result, itertools.chain(head, records),
                         lambda obj, loc, **kw: _convert_tagged(_info_record(obj, entry, loc), loc, **kw),
                         None, on_error, kw)
    if result.n_records == 0:
        raise DataError("empty", f"dataset '{name}' has no records", "add records to its file", file=str(info))
    return result


def read_converted(path: str | os.PathLike, *, on_error: str = "raise",
                   allow_outside_paths: bool = False) -> ConvertResult | None:
    """A dataset file given as data (data.train, data.eval, `data check`): None for our own JSONL,
    which finetune.data.schema reads; else the samples of a LLaMA-Factory file (or
    `dataset_info.json#name`), ms-swift or OpenAI file, converted in memory, with media held inside
    the dataset's folder unless `allow_outside_paths`, as for our JSONL. Preference data and a
    dataset_info.json without a name raise one DataError for the file."""
    if not dataset_ref(path):
        path = Path(path)
        if path.name == _INFO_NAME and path.is_file():
            raise _dataset_info_error(path)
        fmt = dominant_format(path)
        if fmt == "ours" and not (path.is_file() and _is_json_document(path)):
            return None  # JSON lines of our own format: finetune.data.schema reads them as they are
        return convert_file(path, "ours" if fmt == "preference" else fmt, on_error=on_error,
                            allow_outside_paths=allow_outside_paths)
    return convert_file(path, on_error=on_error, allow_outside_paths=allow_outside_paths)


# --------------------------------------------------------------------------- templates


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
    if not isinstance(row, dict):
        raise loc.err("not_object", "", f"the row is {_type_name(row)}, not an object",
                      "write each table row as a JSON object {column: value}")

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


# --------------------------------------------------------------------------- writing


def _relative(path: str, out_dir: str) -> str:
    try:
        rel = os.path.relpath(os.path.abspath(path), out_dir)
        if rel.startswith(".."):
            alt = os.path.relpath(os.path.realpath(path), os.path.realpath(out_dir))
            if not alt.startswith(".."):
                rel = alt
    except ValueError:  # another drive on Windows
        return Path(path).as_posix()
    return Path(rel).as_posix()


def _map_media(sample: dict, fn) -> dict:
    """A deep copy of ``sample`` with ``fn`` applied to every media path and frame."""
    sample = copy.deepcopy(sample)
    for m in sample.get("messages", []):
        if isinstance(m.get("content"), list):
            for p in m["content"]:
                if p.get("type") in MEDIA_TYPES:
                    if "path" in p:
                        p["path"] = fn(p["path"])
                    if "frames" in p:
                        p["frames"] = [fn(f) for f in p["frames"]]
    return sample


def atomic_write(out: Path, write) -> None:
    """Write `out` through write(fh) into a temporary file beside it, then rename it into place
    (fsutil.atomic_open)."""
    with fsutil.atomic_open(out, "w", encoding="utf-8") as fh:
        write(fh)


def write_jsonl(samples: list[dict], out: str | os.PathLike) -> int:
    """Write samples as our JSONL, atomically, with media paths relative to ``out``'s folder.

    Returns how many media paths lie outside that folder (``data check``
    rejects those unless ``--allow-outside-paths``).
    """
    out = Path(out)
    out_dir = os.path.abspath(out.parent)
    outside = 0

    def rel(p: str) -> str:
        nonlocal outside
        r = _relative(p, out_dir)
        outside += r.startswith("..") or os.path.isabs(r)
        return r

    lines = [json.dumps(_map_media(s, rel), ensure_ascii=False) for s in samples]
    atomic_write(out, lambda fh: fh.write("".join(line + "\n" for line in lines)))
    return outside


def _llamafactory_record(sample: dict, rel, where: str) -> dict:
    media: dict[str, list] = {k: [] for k in MEDIA_TYPES}
    messages = []
    for i, m in enumerate(sample["messages"]):
        if m.get("loss") is False:
            raise DataError("turn_loss", 'an assistant turn with "loss": false',
                            "LLaMA-Factory's sharegpt format learns every assistant turn: drop the turn, or keep "
                            "our JSONL", field=f"{where}messages[{i}]")
        content = m["content"]
        pieces = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = ""
        for p in pieces:
            if p["type"] == "text":
                if _TAG_RE.search(p["text"]):
                    raise DataError("placeholder_in_text", "the text contains a literal <image>/<audio>/<video>",
                                    "reword it: LLaMA-Factory would read it as a media placeholder",
                                    field=f"{where}messages[{i}]")
                text += p["text"]
            else:
                text += f"<{p['type']}>"
                media[p["type"]].append([rel(f) for f in p["frames"]] if "frames" in p else rel(p["path"]))
        messages.append({"role": m["role"], "content": text})
    record: dict[str, Any] = {"messages": messages}
    for kind, values in media.items():
        record[_MEDIA_COLUMN[kind]] = values
    for key in ("id", "task", "answer"):
        if sample.get(key) is not None:
            record[key] = sample[key]
    return record


def write_llamafactory(samples: list[dict], out_json: str | os.PathLike) -> int:
    """Write samples (media paths absolute) as a LLaMA-Factory ShareGPT JSON list; returns the count.

    Media parts become ``<image>``/``<audio>``/``<video>`` placeholders at their
    place in the text, with ``images``/``audios``/``videos`` columns relative to
    the output's folder. Part extras (e.g. ``fps``) are not representable and
    are dropped.
    """
    out_json = Path(out_json)
    out_dir = os.path.abspath(out_json.parent)
    records = [_llamafactory_record(s, lambda p: _relative(p, out_dir), f"sample {i}: ")
               for i, s in enumerate(samples)]
    used = [col for col in _MEDIA_COLUMN.values() if any(r[col] for r in records)]
    for r in records:  # keep only columns some record uses, but in every record (one Arrow schema)
        for col in _MEDIA_COLUMN.values():
            if col not in used:
                del r[col]
    atomic_write(out_json, lambda fh: fh.write(json.dumps(records, ensure_ascii=False, indent=1) + "\n"))
    return len(records)


def llamafactory_dataset_info(out_json: str | os.PathLike, samples_or_columns: list) -> dict:
    """The ``dataset_info.json`` entry LLaMA-Factory needs for a file from :func:`write_llamafactory`."""
    columns = {"messages": "messages"}
    for col in _MEDIA_COLUMN.values():
        if col in samples_or_columns:
            columns[col] = col
    return {"file_name": Path(out_json).name, "formatting": "sharegpt", "columns": columns,
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant", "system_tag": "system"}}


def llamafactory_from_ours(samples_jsonl: str | os.PathLike, out_json: str | os.PathLike,
                           *, check_files: bool = True) -> int:
    """Write our JSONL dataset as a LLaMA-Factory ShareGPT JSON list; returns the number of records.

    Read back with ``convert_file(out_json, "llamafactory")``: same messages and media.
    """
    samples, _ = load_samples(Path(samples_jsonl), allow_outside_paths=True, check_files=check_files)
    return write_llamafactory([sample_to_dict(s) for s in samples], out_json)


# --------------------------------------------------------------------------- CLI


def _parse_roles(items: list[str]) -> dict[str, str]:
    roles = {}
    for item in items:
        name, sep, role = item.partition("=")
        if not sep or not name or role not in ("user", "assistant", "system"):
            raise DataError("usage", f"bad --role {item!r}", "write --role NAME=user|assistant|system")
        roles[name] = role
    return roles


def _print_result(result: ConvertResult, out: Path, n_written: int, outside: int, what: str) -> None:
    kinds: Counter = Counter()
    for s in result.samples:
        for m in s["messages"]:
            if isinstance(m["content"], list):
                kinds.update(p["type"] for p in m["content"] if p["type"] in MEDIA_TYPES)
    media = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items()) or "no media"
    print(f"converted {result.source} ({result.format}): {result.n_records} records, "
          f"{n_written} samples written to {out} as {what} ({media}), {len(result.errors)} skipped")
    if result.errors:
        for e in result.errors[:50]:
            print(f"  skipped: {e}", file=sys.stderr)
        if len(result.errors) > 50:
            print(f"  ... and {len(result.errors) - 50} more", file=sys.stderr)
        print("skipped by kind: " + ", ".join(f"{k} {n}" for k, n in result.error_counts().items()))
    if outside:
        print(f"note: {outside} media path(s) lie outside {out.parent}; `data check` rejects them unless "
              "--allow-outside-paths (data.allow_outside_paths: true). Write the output next to the media "
              "to avoid this.")


def main(argv: list[str] | None = None) -> int:
    """``data convert``: a table through a template, or another tool's format, into our JSONL."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m finetune data convert",
        description="Convert a CSV/JSONL table (with --template) or a LLaMA-Factory / ms-swift / OpenAI "
                    "dataset (with --from) into our JSONL format. Media paths are written relative to "
                    "the output file's folder.")
    parser.add_argument("input", type=Path,
                        help="the table or dataset file, or a LLaMA-Factory dataset as dataset_info.json#name")
    parser.add_argument("output", type=Path, help="the JSONL file to write (or .json with --to llamafactory)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--template", "-t", type=Path, help="a template YAML (see data_templates/templates/)")
    src.add_argument("--from", dest="fmt", choices=("auto",) + FORMATS, default="auto",
                     help="the input's format (default: auto-detect)")
    parser.add_argument("--to", choices=("ours", "llamafactory"), default="ours",
                        help="write our JSONL (default) or a LLaMA-Factory ShareGPT JSON list")
    parser.add_argument("--media-root", type=Path,
                        help="resolve relative media paths against this folder (default: the input's folder)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="stop at the first bad record (default) or skip and count bad records")
    parser.add_argument("--role", action="append", default=[], metavar="NAME=ROLE",
                        help="map an extra role name, e.g. --role doctor=assistant (repeatable)")
    parser.add_argument("--no-check-files", action="store_true", help="do not require media files to exist")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.template is not None:
            result = convert_table(args.template, args.input, media_root=args.media_root,
                                   on_error=args.on_error, check_files=not args.no_check_files)
        else:
            result = convert_file(args.input, args.fmt, media_root=args.media_root, on_error=args.on_error,
                                  check_files=not args.no_check_files, role_map=_parse_roles(args.role))
        if not result.samples:
            for e in result.errors[:50]:
                print(f"  skipped: {e}", file=sys.stderr)
            print(f"error: no record of {result.source} could be converted "
                  f"({', '.join(f'{k} {n}' for k, n in result.error_counts().items())}); nothing written",
                  file=sys.stderr)
            return 1
        if args.to == "llamafactory":
            n = write_llamafactory(result.samples, args.output)
            _print_result(result, args.output, n, 0, "LLaMA-Factory ShareGPT")
            used = {p["type"] for s in result.samples for m in s["messages"]
                    if isinstance(m["content"], list) for p in m["content"]}
            cols = [col for kind, col in _MEDIA_COLUMN.items() if kind in used]
            entry = {args.output.stem: llamafactory_dataset_info(args.output, cols)}
            print("dataset_info.json entry:\n" + json.dumps(entry, indent=2))
        else:
            outside = write_jsonl(result.samples, args.output)
            _print_result(result, args.output, len(result.samples), outside, "JSONL")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

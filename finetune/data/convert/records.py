"""What every converter shares: where a record is (:class:`_Loc`), the result of a conversion
(:class:`ConvertResult`), reading JSON-list and JSONL records, resolving media paths and role names,
validating a converted sample, and writing our JSONL back.

The lowest module of :mod:`finetune.data.convert`: the format modules import from it, it imports
none of them."""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import fsutil
from finetune.data.schema import MEDIA_TYPES, DataError, Sample, iter_jsonl, parse_sample

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

_TOOL_ROLES = ("observation", "function_call", "function", "tool", "tool_call", "tool_response", "ipython")

_PREFERENCE_FIX = ("only preference pairs are read (a chosen and a rejected answer to the same prompt, for "
                   "train.method: dpo): LLaMA-Factory ranking files, its v1 chosen_messages/rejected_messages, "
                   "ms-swift's rejected_response, or our last turn with chosen + rejected; give the data in one "
                   "of those forms")


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

    def need_object(self, value: Any, kind: str, fld: str, what: str, fix: str) -> None:
        """Raise the `kind` error unless `value` (the record, a turn, a part) is a JSON object."""
        if not isinstance(value, dict):
            raise self.err(kind, fld, f"the {what} is {_type_name(value)}, not an object", fix)

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


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


# --------------------------------------------------------------------------- reading


def _json_head(path: Path) -> bytes:
    """The first bytes of a file, past a UTF-8 byte-order mark and white space."""
    with open(path, "rb") as fh:
        return fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()


def _is_json_document(path: Path, head: bytes | None = None) -> bool:
    """A JSON list (or one object in a .json file), read whole, rather than JSON lines."""
    head = _json_head(path) if head is None else head
    return head.startswith(b"[") or (head.startswith(b"{") and path.suffix.lower() == ".json")


def _read_records(path: Path) -> Iterator[tuple[_Loc, Any]]:
    """Yield ``(location, object_or_DataError)`` from a JSON list or a JSONL file."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError("missing_file", f"input file '{path}' does not exist", "check the file path",
                        file=source)
    head = _json_head(path)
    if _is_json_document(path, head):
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


# --------------------------------------------------------------------------- samples


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
    if sample.rejected is not None:  # the preference form: the last turn's two answers
        rejected = sample_to_dict(sample.rejected_sample())["messages"][-1]["content"]
        messages[-1] = {"role": "assistant", "chosen": messages[-1]["content"], "rejected": rejected}
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

"""LLaMA-Factory: its v1 records, its ``dataset_info.json`` list of datasets, and our data written
back in its ShareGPT form.

v1 records carry ``text``/``image_url``/``audio_url``/``video_url`` parts with ``value`` and a
``loss_weight`` per turn (0 on an answer keeps it as context: ``"loss": false`` here). A dataset
named as ``folder/dataset_info.json#name`` is read through its entry (file_name, formatting,
columns, tags), media relative to the list's folder as LLaMA-Factory's media_dir. Its sharegpt and
alpaca records are read by :mod:`.sharegpt`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.convert.records import (
    _MEDIA_COLUMN,
    _PREFERENCE_FIX,
    _ROLES,
    _TAG_RE,
    _did_you_mean,
    _finish,
    _Loc,
    _map_role,
    _media_part,
    _outside,
    _relative,
    _type_name,
    atomic_write,
    sample_to_dict,
)
from finetune.data.convert.sharegpt import _convert_tagged
from finetune.data.schema import MEDIA_TYPES, DataError, load_samples

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
        loc.need_object(m, "bad_message", mfld, "turn",
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
            loc.need_object(p, "bad_part", pfld, "part", 'write parts as {"type": "text", "value": "..."}')
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


def _convert_llamafactory(obj: Any, loc: _Loc, **kw) -> dict:
    """A LLaMA-Factory record, v1 or sharegpt/alpaca -> our sample."""
    if _is_v1(obj):
        return _convert_v1(obj, loc, **kw)
    return _convert_tagged(obj, loc, swift=False, **kw)


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
    if columns["kto_tag"]:
        raise bad("the dataset is KTO feedback (kto_tag), not chat samples or preference pairs",
                  _PREFERENCE_FIX, "preference_data")
    if entry.get("ranking"):  # preference pairs: the chosen and rejected columns (as LLaMA-Factory's defaults)
        columns = {**columns, "chosen": columns["chosen"] or "chosen", "rejected": columns["rejected"] or "rejected"}
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
    for key in ("chosen", "rejected"):  # ranking: true
        if c[key] and c[key] not in obj:
            raise loc.err("missing_column", c[key], f"the record has no '{c[key]}' answer (columns.{key} {where}, a "
                          "ranking dataset)", f"give each record its {key} answer, or fix columns.{key} (or "
                          "'ranking') in dataset_info.json")
    if e.formatting == "alpaca":
        for key, ours in (("prompt", "instruction"), ("query", "input"), ("response", "output"),
                          ("history", "history")):
            if c[key] and c[key] in obj:
                out[ours] = obj[c[key]]
        for key in ("chosen", "rejected"):  # a ranking dataset's answers
            if c[key] and c[key] in obj:
                out[key] = obj[c[key]]
        needed = [("prompt", "instruction")] + ([("response", "output")] if "chosen" not in out else [])
        for key, ours in needed:
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
        for key in ("chosen", "rejected"):  # a ranking dataset's answer turns, in the same tags
            m = obj.get(c[key]) if c[key] else None
            if m is not None:
                out[key] = {"role": roles.get(m.get(t["role_tag"]), m.get(t["role_tag"])),
                            "content": m.get(t["content_tag"])} if isinstance(m, dict) else m
    if c["system"] and obj.get(c["system"]) not in (None, ""):
        out["system"] = obj[c["system"]]
    for col in _MEDIA_COLUMN.values():
        if c[col] and obj.get(c[col]) is not None:
            out[col] = obj[c[col]]
    out.update({k: obj[k] for k in ("id", "task", "answer") if k in obj})
    return out


def _refuse_dataset_list(path: Path) -> None:
    """A dataset_info.json given without '#name' is LLaMA-Factory's list of datasets, not a dataset."""
    if path.name != _INFO_NAME or not path.is_file():
        return
    names = list(_read_info(path))
    raise DataError("dataset_info", "this is LLaMA-Factory's list of datasets, not a dataset",
                    f"name one of its datasets after '#', e.g. {path}#{names[0] if names else 'name'} "
                    f"(datasets: {_names(dict.fromkeys(names))})", file=str(path))


# --------------------------------------------------------------------------- writing


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

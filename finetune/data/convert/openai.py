"""OpenAI chat records: ``messages`` whose content is a string or a list of ``text``,
``image_url``, ``input_audio`` (and ``audio_url``/``video_url``) parts that point to **local**
files. Remote URLs and inline base64 data are refused: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.data.convert.records import (
    _MEDIA_COLUMN,
    _SCHEME_RE,
    _finish,
    _Loc,
    _map_role,
    _media_part,
    _type_name,
)
from finetune.data.schema import MEDIA_TYPES

_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# part types only OpenAI records have (format detection)
_OPENAI_PART_TYPES = ("image_url", "input_image", "input_audio", "audio_url", "video_url",
                      "input_text", "output_text")


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
    loc.need_object(obj, "not_object", "", "record", 'write each record as {"messages": [...]}')
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
        loc.need_object(m, "bad_message", mfld, "message", 'write messages as {"role": ..., "content": ...}')
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
            loc.need_object(p, "bad_part", pfld, "part", 'write parts as {"type": "text", "text": ...}')
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

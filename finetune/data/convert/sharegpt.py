"""Records whose text holds ``<image>``/``<audio>``/``<video>`` placeholders for the files of the
``images``/``audios``/``videos`` columns: LLaMA-Factory's sharegpt (``messages`` with role/content,
or ``conversations`` with from/value) and alpaca (``instruction``/``input``/``output``) records, and
ms-swift's (the same ``messages``, or ``query``/``response``/``history``).

The two tools differ in one thing: ms-swift puts the files that have no placeholder at the start of
the first user turn, where LLaMA-Factory wants exactly one placeholder a file. LLaMA-Factory's v1
records and its ``dataset_info.json`` are read in :mod:`.llamafactory`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from finetune.data.convert.records import (
    _MEDIA_COLUMN,
    _ROLES,
    _TAG_RE,
    _finish,
    _Loc,
    _map_role,
    _media_part,
    _type_name,
)

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
    """A LLaMA-Factory sharegpt/alpaca (``swift=False``) or ms-swift (``swift=True``) record -> our sample."""
    loc.need_object(obj, "not_object", "", "record", 'write each record as {"messages": [...], "images": [...]}')
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
            loc.need_object(m, "bad_message", mfld, "turn",
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


def _convert_swift(obj: Any, loc: _Loc, **kw) -> dict:
    """An ms-swift record -> our sample."""
    return _convert_tagged(obj, loc, swift=True, **kw)

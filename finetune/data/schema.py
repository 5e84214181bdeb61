"""The omni-modal chat sample format: dataclasses, validation and JSONL loading.

One JSONL line holds one sample::

    {"id": "s1",
     "messages": [
        {"role": "system", "content": "You are a radiology assistant."},
        {"role": "user", "content": [{"type": "image", "path": "img/0001.png"},
                                     {"type": "text", "text": "Is there a nodule?"}]},
        {"role": "assistant", "content": "Yes, in the right upper lobe."}],
     "answer": "yes"}

Every problem is reported as a :class:`DataError` that names the file, the line,
the JSON field path, what is wrong and how to fix it.

Every input is bounded before it is parsed or decoded (:class:`Limits`, set from the recipe's
``data.max_*`` keys): a line's bytes before JSON parsing, its nesting depth, a sample's text
before tokenising, and (in :mod:`finetune.data.media`) pixels, voxels, seconds and frames from
the media headers. Only regular files are read: a FIFO, device or socket is refused, not opened.
:class:`MediaError` and the checks both media readers share (:func:`require_regular`,
:func:`check_image_pixels`) live here, below :mod:`finetune.data.media` and
:mod:`finetune.data.medical`.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from finetune.data.bounds import (  # noqa: F401  (the readers' bounds; also imported from here)
    MAX_JSON_DEPTH,
    Limits,
    MediaError,
    NotRegularFileError,
    UnsafeJsonError,
    check_image_pixels,
    check_json_tree,
    current_limits,
    loads_bounded,
    open_regular,
    require_regular,
    set_limits,
    special_file,
    too_many_pixels,
)
from finetune.errors import UserError

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("image", "audio", "video")
PART_TYPES = ("text",) + MEDIA_TYPES

# Keys read by the schema itself; everything else on a part goes to Part.extra.
_TEXT_KEYS = {"type", "text"}
_MEDIA_KEYS = {"type", "path", "frames"}
_TOP_KEYS = {"messages", "id", "answer", "task", "chosen", "rejected"}
#: the preference form: the last (assistant) turn holds two answers instead of a 'content'
PREFERENCE_KEYS = ("chosen", "rejected")

# Role names used by other chat formats (ShareGPT, Gemini, ...) that difflib
# would not match to ours because they share no letters.
_ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "ai": "assistant",
    "chatgpt": "assistant",
}

_PATH_FIX = "check the path; paths are relative to the dataset file's folder"

_TREE_FIX = {"too_deep": "flatten it: a sample needs about 6 levels (sample, messages, message, content, part, option)",
             "encoding": "write the character itself or its full surrogate pair (e.g. \\ud83d\\ude00); re-export "
                         "the file with a JSON writer that produces valid Unicode"}


class DataError(UserError, ValueError):
    """A problem in a dataset file, located by file, line and JSON field path."""

    def __init__(
        self,
        kind: str,
        problem: str,
        fix: str = "",
        *,
        file: str = "",
        line: int = 0,
        field: str = "",
    ) -> None:
        self.kind = kind
        self.problem = problem
        self.fix = fix
        self.file = file
        self.line = line
        self.field = field
        super().__init__(str(self))

    def __str__(self) -> str:
        loc = self.file
        if self.line > 0:
            loc = f"{loc}:{self.line}" if loc else f"line {self.line}"
        head = ": ".join(x for x in (loc, self.field) if x)
        text = f"{head}: {self.problem}" if head else self.problem
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text

    def __reduce__(self):
        # Keyword-only arguments are not restored by the default exception
        # pickling, which DataLoader worker processes rely on.
        return (
            _rebuild_data_error,
            (self.kind, self.problem, self.fix, self.file, self.line, self.field),
        )


def _rebuild_data_error(kind, problem, fix, file, line, field_):
    return DataError(kind, problem, fix, file=file, line=line, field=field_)


@dataclass
class Part:
    """One piece of message content: text, or an image/audio/video reference."""

    type: str
    text: str | None = None
    path: Path | None = None
    frames: list[Path] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_media(self) -> bool:
        """True for image, audio and video parts."""
        return self.type in MEDIA_TYPES


@dataclass
class Message:
    """One chat turn."""

    role: str
    parts: list[Part]
    # False: an assistant turn kept as context but not learned ("loss": false; LLaMA-Factory's
    # loss_weight 0). The last assistant turn is always learned.
    loss: bool = True

    def text(self) -> str:
        """The concatenation of this message's text parts."""
        return "".join(p.text or "" for p in self.parts if p.type == "text")


@dataclass
class Sample:
    """One validated conversation with its media paths resolved to absolute paths."""

    messages: list[Message]
    answer: str | None = None
    id: str | None = None
    task: str | None = None
    source: str = ""
    line: int = 0
    meta: dict = field(default_factory=dict)
    #: the preference form: the rejected answer; messages[-1] is then the chosen one
    rejected: Message | None = None

    @property
    def is_preference(self) -> bool:
        """True for a preference pair (a chosen and a rejected last answer)."""
        return self.rejected is not None

    def chosen_sample(self) -> "Sample":
        """The conversation ending with the chosen answer, as a plain sample."""
        return Sample(messages=self.messages, answer=self.answer, id=self.id, task=self.task, source=self.source,
                      line=self.line, meta=self.meta)

    def rejected_sample(self) -> "Sample":
        """The same prompt ending with the rejected answer, as a plain sample."""
        return Sample(messages=self.messages[:-1] + [self.rejected], answer=self.answer, id=self.id, task=self.task,
                      source=self.source, line=self.line, meta=self.meta)

    def media(self) -> list[Part]:
        """Media parts in order of appearance."""
        return [p for m in self.messages for p in m.parts if p.is_media]

    def modalities(self) -> set[str]:
        """The part types present, e.g. ``{"text", "image", "audio"}``."""
        return {p.type for m in self.messages for p in m.parts}

    @property
    def where(self) -> str:
        """``file:line`` of the sample, for messages."""
        return f"{self.source}:{self.line}"


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _did_you_mean(value: Any, choices: tuple[str, ...], aliases: dict | None = None) -> str:
    if not isinstance(value, str):
        return ""
    low = value.strip().lower()
    if aliases and low in aliases:
        return aliases[low]
    if low in choices:
        return low
    close = difflib.get_close_matches(low, choices, n=1, cutoff=0.5)
    return close[0] if close else ""


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def parse_sample(
    obj: Any,
    *,
    source: str,
    line: int,
    base_dir: Path,
    allow_outside_paths: bool = False,
    check_files: bool = True,
    max_text_chars: int | None = None,
) -> Sample:
    """Validate one decoded JSONL object and build a :class:`Sample`.

    Raises :class:`DataError` for the first problem found (structure, then
    path safety and file existence when ``check_files``, then the sample's text
    against ``max_text_chars``, default the current :class:`Limits`).
    """

    def err(kind: str, fld: str, problem: str, fix: str = "") -> DataError:
        return DataError(kind, problem, fix, file=source, line=line, field=fld)

    base = Path(base_dir).resolve()

    if not isinstance(obj, dict):
        raise err("not_object", "", f"the line is {_type_name(obj)}, not a JSON object",
                  'write one object per line: {"messages": [...]}')
    try:  # the JSONL reader checked its lines already; other formats and tables come here directly
        check_json_tree(obj)
    except UnsafeJsonError as e:
        raise err(e.kind, "", str(e), _TREE_FIX[e.kind]) from None

    if "messages" not in obj:
        if "conversations" in obj:
            fix = ("rename 'conversations' to 'messages' (and ShareGPT 'from'/'value' "
                   "to 'role'/'content')")
        else:
            fix = 'add "messages": [{"role": "user", ...}, {"role": "assistant", ...}]'
        raise err("missing_messages", "messages", "the sample has no 'messages'", fix)
    raw_messages = obj["messages"]
    if isinstance(raw_messages, list) and any(k in obj for k in PREFERENCE_KEYS):
        raw_messages = _top_level_pair(obj, raw_messages, err)
    if not isinstance(raw_messages, list):
        raise err(
            "bad_messages", "messages",
            f"'messages' is {_type_name(raw_messages)}, not a list",
            "make 'messages' a list of {\"role\": ..., \"content\": ...} objects",
        )
    if not raw_messages:
        raise err("empty", "messages", "'messages' is empty",
                  "add at least one user turn and one assistant turn")

    messages: list[Message] = []
    rejected: Message | None = None
    prev_role: str | None = None
    for i, raw in enumerate(raw_messages):
        mfield = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise err("bad_message", mfield,
                      f"the message is {_type_name(raw)}, not an object",
                      'write each message as {"role": ..., "content": ...}')
        role = _parse_role(raw, mfield, err)
        if role == "system" and i != 0:
            raise err("system_not_first", f"{mfield}.role",
                      "a system message may only be the first message",
                      "move the system message to the start, or merge it into the first one")
        if role == prev_role:
            raise err("same_role_twice", f"{mfield}.role",
                      f"two consecutive '{role}' messages (messages[{i - 1}] and messages[{i}])",
                      "merge them into one message, or insert the missing turn between them")
        prev_role = role
        if any(k in raw for k in PREFERENCE_KEYS):
            rejected = _parse_pair(raw, role, i == len(raw_messages) - 1, mfield, err, base, allow_outside_paths,
                                   check_files)
            messages.append(Message(role=role, parts=_parse_content({"content": raw["chosen"]}, role, f"{mfield}.chosen",
                                                                    err, base, allow_outside_paths, check_files,
                                                                    key="chosen")))
            continue
        parts = _parse_content(raw, role, mfield, err, base, allow_outside_paths, check_files)
        messages.append(Message(role=role, parts=parts, loss=_parse_loss(raw, role, mfield, err)))

    if not any(m.role == "assistant" for m in messages):
        raise err("no_assistant", "messages", "the conversation has no assistant turn",
                  "add an assistant message with the target reply; loss is computed on "
                  "assistant turns only")
    if messages[-1].role != "assistant":
        raise err("not_ending_with_assistant", f"messages[{len(messages) - 1}].role",
                  f"the conversation ends with a '{messages[-1].role}' turn",
                  "end with the assistant reply, or drop the trailing turn")
    if not messages[-1].loss:
        raise err("bad_loss", f"messages[{len(messages) - 1}].loss",
                  'the last assistant turn has "loss": false, so the sample teaches nothing',
                  'remove "loss": false from the last turn (it is the answer the sample teaches), '
                  "or drop the turn")

    sample_id = obj.get("id")
    if sample_id is not None:
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
            raise err("bad_id", "id", f"'id' is {_type_name(sample_id)}",
                      "make 'id' a string")
        sample_id = str(sample_id)

    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise err("bad_answer", "answer", f"'answer' is {_type_name(answer)}, not a string",
                  f"write it as a string, e.g. \"answer\": {json.dumps(str(answer))}")

    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise err("bad_task", "task", f"'task' is {_type_name(task)}, not a string",
                  "make 'task' a short string tag")

    cap = current_limits().max_text_chars if max_text_chars is None else max_text_chars
    n_chars = sum(len(p.text or "") for m in messages for p in m.parts) + len(answer or "")
    if n_chars > cap:
        raise err("text_too_long", "messages",
                  f"the sample holds {n_chars:,} characters of text, more than data.max_text_chars={cap:,} "
                  "(checked before tokenising)",
                  "shorten or split it (it could not fit data.max_tokens anyway), or raise data.max_text_chars")

    meta = {k: v for k, v in obj.items() if k not in _TOP_KEYS}
    return Sample(messages=messages, answer=answer, id=sample_id, task=task,
                  source=source, line=line, meta=meta, rejected=rejected)


def _answer(value):
    """An answer given as a column: text or parts, an assistant message, or a list of one (TRL's
    conversational form) -> the turn's content."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "role" in value[0]:
        value = value[0]
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    return value


def _top_level_pair(obj: dict, raw_messages: list, err) -> list:
    """`messages` (the prompt) with top-level `chosen` and `rejected` answers (a table's columns) ->
    the messages with the preference turn appended."""
    missing = [k for k in PREFERENCE_KEYS if k not in obj]
    if missing:
        raise err("bad_pair", missing[0], f"the sample has no '{missing[0]}' answer beside "
                  f"'{PREFERENCE_KEYS[missing[0] == 'chosen']}'", f"add \"{missing[0]}\" (a pair needs both answers)")
    if raw_messages and isinstance(raw_messages[-1], dict) and raw_messages[-1].get("role") == "assistant":
        raise err("bad_pair", f"messages[{len(raw_messages) - 1}]", "the prompt ends with an assistant turn, and "
                  "'chosen'/'rejected' answer it again", "end 'messages' with the user's turn that both answers reply to")
    return raw_messages + [{"role": "assistant", "chosen": _answer(obj["chosen"]), "rejected": _answer(obj["rejected"])}]


def _parse_pair(raw: dict, role: str, last: bool, mfield: str, err, base, allow_outside, check_files) -> Message:
    """The rejected answer of a preference turn (`chosen` and `rejected` instead of `content`),
    after checking that the turn may hold a pair."""
    if not last or role != "assistant":
        where = f"a {role} turn" if last else "a turn that is not the last"
        raise err("bad_pair", mfield, f"'chosen'/'rejected' on {where}",
                  "put the two answers on the last turn, an assistant one: "
                  '{"role": "assistant", "chosen": "...", "rejected": "..."}')
    missing = [k for k in PREFERENCE_KEYS if k not in raw]
    if missing:
        raise err("bad_pair", f"{mfield}.{missing[0]}", f"the preference turn has no '{missing[0]}' answer",
                  f"add \"{missing[0]}\": the {'preferred' if missing[0] == 'chosen' else 'dispreferred'} answer "
                  "(a pair needs both)")
    if "content" in raw:
        raise err("bad_pair", f"{mfield}.content", "the preference turn has 'content' besides 'chosen' and 'rejected'",
                  "remove 'content': the turn's answers are 'chosen' and 'rejected'")
    if "loss" in raw:
        raise err("bad_loss", f"{mfield}.loss", "'loss' on a preference turn", "remove it: both answers are learned")
    parts = _parse_content({"content": raw["rejected"]}, role, f"{mfield}.rejected", err, base, allow_outside,
                           check_files, key="rejected")
    if raw["rejected"] == raw["chosen"]:
        raise err("bad_pair", f"{mfield}.rejected", "the rejected answer is the chosen one",
                  "give a different, dispreferred answer as 'rejected', or drop the pair (it teaches nothing)")
    return Message(role=role, parts=parts)


def _parse_role(raw: dict, mfield: str, err) -> str:
    if "role" not in raw:
        if "from" in raw:
            fix = "rename 'from' to 'role' and 'value' to 'content'"
        else:
            fix = f"add \"role\": one of {', '.join(ROLES)}"
        raise err("missing_role", mfield, "the message has no 'role'", fix)
    role = raw["role"]
    if role not in ROLES:
        guess = _did_you_mean(role, ROLES, _ROLE_ALIASES)
        fix = f"did you mean '{guess}'? " if guess else ""
        raise err("unknown_role", f"{mfield}.role", f"unknown role {json.dumps(role)}",
                  f"{fix}use one of: {', '.join(ROLES)}")
    return role


def _parse_loss(raw: dict, role: str, mfield: str, err) -> bool:
    if "loss" not in raw:
        return True
    loss = raw["loss"]
    if not isinstance(loss, bool):
        raise err("bad_loss", f"{mfield}.loss", f"'loss' is {_type_name(loss)}, not true or false",
                  'write "loss": false on an assistant turn to keep it as context without learning it')
    if role != "assistant":
        raise err("bad_loss", f"{mfield}.loss", f"'loss' on a {role} turn",
                  "remove it: only assistant turns are learned")
    return loss


def _parse_content(raw, role, mfield, err, base, allow_outside, check_files, key: str = "") -> list[Part]:
    cfield = mfield if key else f"{mfield}.content"
    if "content" not in raw:
        fix = ("rename 'value' to 'content'" if "value" in raw
               else "add \"content\": a string or a list of parts")
        raise err("missing_content", mfield, "the message has no 'content'", fix)
    content = raw["content"]
    if isinstance(content, str):
        if not content.strip():
            raise err("empty", cfield, "the text is empty",
                      "write the message text, or remove the message")
        return [Part(type="text", text=content)]
    if isinstance(content, dict):
        raise err("bad_content", cfield, "'content' is an object, not a string or a list",
                  "wrap the part in a list: \"content\": [{...}]")
    if not isinstance(content, list):
        raise err("bad_content", cfield,
                  f"'content' is {_type_name(content)}, not a string or a list of parts",
                  "use a string, or a list of {\"type\": \"text\"|\"image\"|\"audio\"|\"video\", ...}")
    if not content:
        raise err("empty", cfield, "'content' is an empty list",
                  "add at least one part, or remove the message")
    parts = []
    for j, raw_part in enumerate(content):
        pfield = f"{cfield}[{j}]"
        parts.append(_parse_part(raw_part, role, pfield, err, base, allow_outside, check_files))
    return parts


def _parse_part(raw, role, pfield, err, base, allow_outside, check_files) -> Part:
    if isinstance(raw, str):
        raise err("bad_part", pfield, "the part is a bare string",
                  f"write it as {{\"type\": \"text\", \"text\": {json.dumps(raw[:40])}}}")
    if not isinstance(raw, dict):
        raise err("bad_part", pfield, f"the part is {_type_name(raw)}, not an object",
                  'write parts as {"type": "text", "text": ...} or {"type": "image", "path": ...}')
    if "type" not in raw:
        guess = next((t for t in PART_TYPES if t in raw), None)
        fix = (f"add \"type\": \"{guess}\"" if guess
               else f"add \"type\": one of {', '.join(PART_TYPES)}")
        raise err("bad_part", pfield, "the part has no 'type'", fix)
    ptype = raw["type"]
    if ptype not in PART_TYPES:
        guess = _did_you_mean(ptype, PART_TYPES,
                              {"image_url": "image", "input_audio": "audio", "img": "image"})
        hint = f"did you mean '{guess}'? " if guess else ""
        raise err("unknown_part_type", f"{pfield}.type", f"unknown part type {json.dumps(ptype)}",
                  f"{hint}use one of: {', '.join(PART_TYPES)}")

    if ptype == "text":
        text = raw.get("text")
        if not isinstance(text, str):
            what = "has no 'text'" if "text" not in raw else f"has 'text' of {_type_name(text)}"
            raise err("bad_part", f"{pfield}.text", f"the text part {what}",
                      "give the text as a string: {\"type\": \"text\", \"text\": \"...\"}")
        if not text.strip():
            raise err("empty", f"{pfield}.text", "the text is empty",
                      "write the text, or remove the part")
        return Part(type="text", text=text,
                    extra={k: v for k, v in raw.items() if k not in _TEXT_KEYS})

    if role != "user":
        raise err("media_not_allowed", pfield, f"a {ptype} part in a {role} turn",
                  f"put images, audio and video in user turns; {role} turns are text only")

    extra = {k: v for k, v in raw.items() if k not in _MEDIA_KEYS}
    has_path = "path" in raw
    has_frames = ptype == "video" and "frames" in raw
    if has_path and has_frames:
        raise err("bad_part", pfield, "the video part has both 'path' and 'frames'",
                  "keep one: a folder/video file in 'path', or a list of frame paths in 'frames'")
    if has_frames:
        frames = raw["frames"]
        if not isinstance(frames, list) or not frames:
            raise err("bad_part", f"{pfield}.frames",
                      "'frames' must be a non-empty list of image paths",
                      "list the frame files in order, e.g. [\"clip/000.png\", \"clip/001.png\"]")
        cap = current_limits().max_video_frames
        if len(frames) > cap:  # before a path is resolved: each costs a few system calls
            raise err("too_large", f"{pfield}.frames",
                      f"the video's frame list has {len(frames):,} frames, more than data.max_video_frames={cap:,}",
                      "list fewer frames (the models sample model.video_fps frames a second), or raise "
                      "data.max_video_frames in the recipe")
        resolved = [
            _resolve(f, f"{pfield}.frames[{k}]", err, base, allow_outside, check_files)
            for k, f in enumerate(frames)
        ]
        return Part(type="video", frames=resolved, extra=extra)
    if not has_path:
        if ptype in raw or "url" in raw or "image_url" in raw:
            key = ptype if ptype in raw else ("url" if "url" in raw else "image_url")
            fix = f"rename '{key}' to 'path' (a local file path)"
        elif ptype == "video":
            fix = "add \"path\" (a folder of frames or a video file) or \"frames\" (a list of images)"
        else:
            fix = f"add \"path\": the {ptype} file, relative to the dataset file's folder"
        raise err("missing_path", pfield, f"the {ptype} part has no 'path'", fix)
    path = _resolve(raw["path"], f"{pfield}.path", err, base, allow_outside, check_files)
    return Part(type=ptype, path=path, extra=extra)


def _resolve(value, fld, err, base: Path, allow_outside: bool, check_files: bool) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else _type_name(value)
        raise err("bad_part", fld, f"the path is {what}", "give the file path as a non-empty string")
    if "\x00" in value:
        raise err("bad_part", fld, f"the path {json.dumps(value[:80])} holds a NUL character",
                  "give the file's real path (no path may contain NUL)")
    try:
        # resolve() follows symlinks and '..', so the containment test below sees
        # where the file really lives, not how the path was spelled.
        full = (base / Path(value).expanduser()).resolve()
        exists = check_files and full.exists()
    except RuntimeError:  # Python < 3.13 raises this for a symbolic link loop
        raise err("bad_part", fld, f"path '{value[:200]}' is a symbolic link loop",
                  "point the symlink at the file itself") from None
    except OSError as e:  # a name too long for the file system, a loop on newer Pythons, ...
        why = {36: "is too long for the file system", 40: "is a symbolic link loop"}.get(e.errno, f"cannot be "
                                                                                              f"read: {e.strerror}")
        raise err("bad_part", fld, f"path '{value[:200]}{'...' if len(value) > 200 else ''}' {why}",
                  _PATH_FIX) from None
    if not allow_outside and not _is_within(full, base):
        raise err("outside_path", fld,
                  f"path '{value}' resolves to '{full}', outside the dataset folder '{base}'",
                  "move the file under the dataset folder, or set data.allow_outside_paths: true")
    if check_files and not exists:
        raise err("missing_file", fld, f"file '{value}' does not exist (looked for {full})",
                  _PATH_FIX)
    what = special_file(full) if check_files else None
    if what is not None and what != "a folder":  # a folder is a video's frames; an image or audio says so later
        raise err("not_regular_file", fld, f"'{value}' is {what}, not a regular file",
                  "replace it with the file itself; only regular files are read (a FIFO or device could block "
                  "the reader or never end)")
    return full


def iter_jsonl(path: Path, *, max_line_bytes: int | None = None) -> Iterator[tuple[int, Any | DataError]]:
    """Yield ``(line_number, object_or_DataError)`` for each non-blank line.

    Non-UTF-8 bytes, JSON syntax errors, a line longer than ``max_line_bytes``
    (default the current :class:`Limits`; read no further than that, so a
    line of gigabytes costs no memory) and nesting beyond MAX_JSON_DEPTH are
    yielded as :class:`DataError` instead of raised, so a caller can report
    every bad line in one pass. Only a regular file is opened.
    """
    path = Path(path)
    source = str(path)
    cap = current_limits().max_line_bytes if max_line_bytes is None else max_line_bytes
    try:
        fh = open_regular(path)
    except NotRegularFileError as e:
        raise DataError("not_regular_file", f"the dataset file is {e.what}, not a regular file",
                        "give the dataset file itself; only regular files are read", file=source) from None
    with fh:
        lineno = 0
        while True:
            raw = fh.readline(cap + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                n = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a block at a time
                    raw = fh.readline(1 << 20)
                    n += len(raw)
                n -= raw.endswith(b"\n")
                yield lineno, DataError(
                    "line_too_long",
                    f"the line is {n:,} bytes, more than data.max_line_bytes={cap:,} (not parsed)",
                    "shorten the sample (media go in files named by 'path', not inline), or raise "
                    "data.max_line_bytes", file=source, line=lineno)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                # Editors on Windows often prepend a BOM; it is not a data error.
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(
                    "encoding",
                    f"the line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})",
                    "re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl",
                    file=source, line=lineno)
                continue
            text = text.strip()
            if not text:
                continue
            try:
                yield lineno, loads_bounded(text)
            except UnsafeJsonError as e:
                yield lineno, DataError(e.kind, str(e), _TREE_FIX[e.kind], file=source, line=lineno)
            except MemoryError:
                yield lineno, DataError("out_of_memory", f"parsing the {len(raw):,}-byte line ran out of memory",
                                        "shorten the sample, or lower data.max_line_bytes", file=source, line=lineno)
            except json.JSONDecodeError as e:
                if text in ("[", "{", "]", "}", "},", "],"):
                    fix = ("JSONL needs one complete sample per line; collapse pretty-printed "
                           "JSON with e.g. jq -c '.[]' in.json > out.jsonl")
                else:
                    fix = f"make the line one complete JSON object; check quotes, commas and brackets near column {e.colno}"
                yield lineno, DataError(
                    "json", f"invalid JSON at column {e.colno}: {e.msg}", fix,
                    file=source, line=lineno)
            except ValueError as e:  # valid syntax Python will not read, e.g. an integer of over 4300 digits
                yield lineno, DataError("json", f"unreadable JSON: {str(e).split(';')[0]}",
                                        "write huge numbers as strings", file=source, line=lineno)


def load_samples(
    path: Path,
    *,
    on_error: str = "raise",
    allow_outside_paths: bool = False,
    check_files: bool = True,
) -> tuple[list[Sample], list[DataError]]:
    """Load and validate every sample of a JSONL file.

    ``on_error="raise"`` raises the first :class:`DataError`; ``"skip"`` drops
    bad lines and returns their errors alongside the good samples.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path = Path(path)
    base_dir = path.parent
    samples: list[Sample] = []
    errors: list[DataError] = []
    for lineno, obj in iter_jsonl(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            samples.append(parse_sample(
                obj, source=str(path), line=lineno, base_dir=base_dir,
                allow_outside_paths=allow_outside_paths, check_files=check_files))
        except DataError as e:
            if on_error == "raise":
                raise
            errors.append(e)
    return samples, errors

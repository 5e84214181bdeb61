"""What reading a user's files may cost: the recipe's bounds (`data.max_*`, process-wide), regular
files only (a FIFO or a device would block or never end), the image pixel cap, and JSON nesting
checked before any recursive code sees it. Below the sample schema and the media readers, which
both apply them."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from finetune.errors import UserError

#: JSON nesting a sample may have: a chat sample needs about 6 levels (sample, messages, message,
#: content, part, option); anything far deeper is refused before it reaches recursive code.
MAX_JSON_DEPTH = 64


@dataclass(frozen=True)
class Limits:
    """Caps on one input, checked before it is parsed, tokenised or decoded (issue 25).

    The defaults are the recipe's (`data.max_*` in finetune/recipe.py reads them from here): far
    above what the families use (model.max_pixels, the longest audio a model reads) and far below
    what would exhaust memory or time. Pixels, voxels, seconds and frames come from file headers.
    """

    max_line_bytes: int = 16 << 20  # one JSONL line, before JSON parsing
    max_text_chars: int = 1_000_000  # all text of one sample, before tokenising (~250k tokens)
    max_image_pixels: int = 1 << 26  # one image, 67,108,864 = 8192 x 8192
    max_volume_voxels: int = 1 << 29  # a NIfTI volume or multi-frame DICOM, 536,870,912 = 512 x 512 x 2048
    max_audio_seconds: float = 3600.0  # one recording (at up to 48 kHz; see media.AUDIO_BUDGET_RATE)
    max_video_seconds: float = 3600.0  # one video file
    max_video_frames: int = 108_000  # frames of one video (file, folder or list): an hour at 30 fps

    @classmethod
    def of(cls, config) -> "Limits":
        """The limits set on a recipe's data section (any object with the `max_*` attributes)."""
        return cls(**{f.name: getattr(config, f.name, f.default) for f in fields(cls)})


_limits = Limits()


def current_limits() -> Limits:
    """The limits in force in this process (the defaults until a recipe sets its own)."""
    return _limits


def set_limits(limits: Limits) -> None:
    """Make `limits` the ones every reader uses when not given others (reading a recipe's data sets them)."""
    global _limits
    _limits = limits


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class NotRegularFileError(UserError, OSError):
    """A path names a FIFO, a device, a socket or a folder where a file's content is read."""

    def __init__(self, path, what: str) -> None:
        self.path, self.what = str(path), what
        super().__init__(f"'{path}' is {what}, not a regular file; only regular files are read "
                         "(reading a FIFO or device could block or never end)")


def special_file(path) -> str | None:
    """What `path` is when it exists and is not a regular file ("a FIFO (named pipe)", "a folder", ...),
    else None. Follows symbolic links, as opening would."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), "not a regular file")


def open_regular(path):
    """Open a regular file for binary reading, refusing anything else without blocking: the open is
    non-blocking (a FIFO with no writer would wait forever) and the opened file is checked, so a path
    swapped for a FIFO after a stat is still refused."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, next((w for test, w in _SPECIAL if test(mode)), "not a regular file"))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class MediaError(UserError):
    """A media file could not be read; ``kind`` optionally refines the category and ``fix``, when
    given, is the specific fix (which recipe key to raise, how to downsample). Raised by the readers
    of finetune.data.media and finetune.data.medical."""

    def __init__(self, message: str, kind: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.fix = fix


def require_regular(path: Path, what: str) -> None:
    """Refuse a path that exists and is not a regular file (a FIFO would block the reader forever,
    a device would never end) before any reader opens it."""
    kind = special_file(path)
    if kind is not None:
        raise MediaError(f"{what} '{path}' is {kind}, not a regular file; only regular files are read",
                         kind="not_regular_file",
                         fix="replace it with the file itself (a FIFO or device could block the reader or never end)")


def too_many_pixels(path, what: str, pixels: int | None, size: str = "") -> MediaError:
    """The error for an image whose header claims more than data.max_image_pixels."""
    cap = current_limits().max_image_pixels
    got = f"{size} = {pixels:,} pixels" if size else (f"{pixels:,} pixels" if pixels else "too many pixels")
    return MediaError(f"{what} '{path}' is {got} (from its header), more than data.max_image_pixels={cap:,}; "
                      "it was not decoded", kind="too_large",
                      fix="downsample it (the model resizes every image to model.max_pixels anyway), e.g. "
                          "mogrify -resize 4096x4096 FILE, or raise data.max_image_pixels in the recipe")


def check_image_pixels(path, width: int, height: int, what: str = "image") -> None:
    """Refuse an image whose header claims more than data.max_image_pixels."""
    if int(width) * int(height) > current_limits().max_image_pixels:
        raise too_many_pixels(path, what, int(width) * int(height), f"{int(width)}x{int(height)}")


class UnsafeJsonError(ValueError):
    """Parsed JSON that later steps could not use: `kind` is too_deep (nested beyond MAX_JSON_DEPTH, or
    beyond what the JSON reader's recursion allows) or encoding (a string holding a lone UTF-16
    surrogate, such as the escape \\ud800 without its pair: not text, and no file could hold it)."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind


def check_json_tree(obj: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise UnsafeJsonError when `obj` nests lists/objects more than `limit` deep or holds a string
    (key or value) with a lone surrogate. Walked without recursion, so any depth is safe to check."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise UnsafeJsonError("encoding", f"a string holds a lone UTF-16 surrogate "
                                          f"({json.dumps(node[e.start])}), which is not a character") from None
            continue
        if isinstance(node, dict):
            items = [*node.keys(), *node.values()]
        elif isinstance(node, list):
            items = node
        else:
            continue
        if depth > limit:
            raise UnsafeJsonError("too_deep", f"the JSON is nested more than {limit} levels deep")
        stack.extend((v, depth + 1) for v in items if isinstance(v, (str, dict, list)))


def loads_bounded(text: str | bytes):
    """json.loads, then check_json_tree: a line nested thousands deep (a RecursionError inside the
    reader) or beyond MAX_JSON_DEPTH, or holding a lone surrogate, raises UnsafeJsonError; any other
    ValueError (JSON syntax, an integer of more than 4300 digits) passes through."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise UnsafeJsonError("too_deep", f"the JSON is nested deeper than the JSON reader can follow (more "
                                          f"than {MAX_JSON_DEPTH} levels are refused)") from None
    check_json_tree(obj)
    return obj

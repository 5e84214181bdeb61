"""The checks of one sample (layer 4), shared by `data check` (finetune.data.check: the report) and
the checks before step 1 (finetune.data.prepare): its media decoded as training decodes them
(each file once, by identity), the modalities its model takes, and the sample encoded as the
collator will encode it and held against what the model's forward checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from finetune import fsutil
from finetune.data import media
from finetune.data.media import MediaError
from finetune.data.schema import MEDIA_TYPES, DataError, Part, Sample, UnsafeJsonError, current_limits
from finetune.families import registry

_MEDIA_FIX = {
    "unreadable_image": "re-export the image as PNG or JPEG, or remove the sample",
    "unreadable_audio": "re-encode the audio as WAV or FLAC, or remove the sample",
    "empty_audio": "replace the recording with a non-empty one, or remove the sample",
    "unreadable_video": "re-export the video as a folder of PNG/JPEG frames, or remove the sample",
    "bad_media_option": "use one of the allowed values named in the message",
    "missing_extra": 'install the [medical] extra: pip install -e ".[medical]"',
    "non_finite": "replace the NaN/infinite values with numbers and save the file again, or remove the sample",
    "too_large": "downsample or shorten the file, or raise the data.max_* cap named in the message",
    "not_regular_file": "replace it with the file itself; only regular files are read",
    "out_of_memory": "downsample or shorten the file, or lower the data.max_* caps so such files are refused",
}


# Decoding a video file only proves the container is readable; a few frames suffice.
_VIDEO_CHECK_FRAMES = 8


class MediaChecker:
    """Decodes media once per file, however many samples reference it.

    With `record` (a JSON file), files that decoded are remembered by path, options, size and
    modification time, and are not decoded again while they stay unchanged: a resumed or
    repeated run starts without re-reading a large dataset. Failures are never remembered.
    """

    def __init__(self, record: Path | None = None) -> None:
        self._cache: dict[tuple[str, object], tuple[str, str] | None] = {}
        self._record_path = record
        self._ok: dict[str, list[int]] = {}
        if record is not None and record.exists():
            try:
                self._ok = json.loads(record.read_text())
            except (OSError, ValueError):
                self._ok = {}  # a damaged record only costs a re-decode

    def _try(self, kind: str, path: object, fn: Callable[[], object]) -> tuple[str, str, str | None] | None:
        where = path[0] if isinstance(path, tuple) else path
        try:
            st = Path(where).stat()
        except (OSError, ValueError):
            st = None
        # one file is decoded once, under whichever names it has: a folder of 100k hard links to one
        # large image is one decode, not 100k
        ident = (st.st_dev, st.st_ino) if st is not None else str(where)
        key = (kind, (ident, path[1]) if isinstance(path, tuple) else ident)
        if key not in self._cache:
            rkey = repr((kind, path))
            # the caps are part of the stamp: a file that decoded under higher ones is checked again
            stamp = ([st.st_size, st.st_mtime_ns, repr(current_limits())]
                     if st is not None and self._record_path is not None else None)
            if stamp is not None and self._ok.get(rkey) == stamp:
                self._cache[key] = None
                return None
            try:
                fn()
                self._cache[key] = None
                if stamp is not None:
                    self._ok[rkey] = stamp
            except MediaError as e:
                self._cache[key] = (e.kind if e.kind in _MEDIA_FIX else kind, str(e), e.fix)
            # one bad file never ends the check: whatever its decoder raises is that file's problem
            except MemoryError:
                self._cache[key] = ("out_of_memory", f"decoding '{where}' ran out of memory", None)
            except RecursionError:
                self._cache[key] = (kind, f"decoding '{where}' recursed too deep (a malformed or hostile file)", None)
            except Exception as e:
                self._cache[key] = (kind, f"cannot read '{where}': {type(e).__name__}: {e}", None)
            if self._cache[key] is not None:
                self._ok.pop(rkey, None)
        elif self._cache[key] is None and self._record_path is not None and st is not None:
            # another name of a file that decoded
            self._ok[repr((kind, path))] = [st.st_size, st.st_mtime_ns, repr(current_limits())]
        return self._cache[key]

    def save(self) -> None:
        """Write the record of files that decoded (atomically; a concurrent run may overwrite it)."""
        if self._record_path is not None:

            fsutil.atomic_write_text(self._record_path, json.dumps(self._ok))

    def problems(self, part: Part, fld: str) -> Iterable[tuple[str, str, str, str | None]]:
        """Yield ``(kind, field, problem, fix or None)`` for every unreadable file of a part."""
        if part.type == "image":
            # Options (DICOM/NIfTI window, frame, slice) are part of the key:
            # the same file may be read with different options by other samples.
            key = (part.path, repr(sorted(part.extra.items(), key=lambda kv: kv[0])))
            res = self._try("unreadable_image", key, lambda: media.load_images(part))
            if res:
                yield res[0], f"{fld}.path", res[1], res[2]
        elif part.type == "audio":
            res = self._try("unreadable_audio", part.path,
                            lambda: media.load_audio(part.path, sampling_rate=None))
            if res:
                yield res[0], f"{fld}.path", res[1], res[2]
        elif part.type == "video":
            yield from self._video_problems(part, fld)

    def _video_problems(self, part: Part, fld: str):
        try:
            if part.frames:
                media.check_frame_count(len(part.frames), "the video's frame list")
                frames = [(f"{fld}.frames[{k}]", p) for k, p in enumerate(part.frames)]
            elif part.path is not None and part.path.is_dir():
                frames = [(f"{fld}.path", p) for p in media.list_video_frames(part.path)]
            else:
                res = self._try("unreadable_video", part.path,
                                lambda: media.load_video(part, max_frames=_VIDEO_CHECK_FRAMES))
                if res:
                    yield _video_kind(res[0]), f"{fld}.path", res[1], res[2]
                return
        except MediaError as e:
            yield _video_kind(e.kind), f"{fld}.frames" if part.frames else f"{fld}.path", str(e), e.fix
            return
        # Every frame is decoded because training may sample any of them.
        for frame_field, p in frames:
            res = self._try("unreadable_video", p, lambda p=p: media.load_image(p))
            if res:
                yield _video_kind(res[0]), frame_field, res[1], res[2]


def _video_kind(kind: str | None) -> str:
    """A video's problem kind: a cap, a special file or memory as such, any other failure unreadable_video."""
    return kind if kind in ("too_large", "not_regular_file", "out_of_memory") else "unreadable_video"


def media_errors(sample: Sample, checker: "MediaChecker | None" = None) -> list[DataError]:
    """Every unreadable media file of a sample (decoded fully, once per file per checker)."""
    checker = checker or MediaChecker()
    out: list[DataError] = []
    for i, msg in enumerate(sample.messages):
        for j, part in enumerate(msg.parts):
            if part.is_media:
                for kind, fld, problem, fix in checker.problems(part, f"messages[{i}].content[{j}]"):
                    out.append(DataError(kind, problem, fix or _MEDIA_FIX[kind], file=sample.source,
                                         line=sample.line, field=fld))
    return out


def modality_errors(sample: Sample, family) -> list[DataError]:
    """One located error per media part of a kind the family's model cannot take
    (`Family.modalities`), with the fix: drop the part or the sample, or a model that takes it."""
    out: list[DataError] = []
    for i, msg in enumerate(sample.messages):
        for j, part in enumerate(msg.parts):
            if part.is_media and part.type not in family.modalities:
                takes = " and ".join(t for t in MEDIA_TYPES if t in family.modalities) or "text only"
                others = sorted(cls.title for cls in registry().values() if part.type in cls.modalities)
                fix = (f"remove the {part.type} part, or the sample (data.on_error: skip leaves such samples out "
                       f"and counts them)" + (f", or train a model that takes {part.type} ({', '.join(others)})"
                                              if others else ""))
                out.append(DataError("modality", f"{family.title} takes {takes}, not {part.type}", fix,
                                     file=sample.source, line=sample.line, field=f"messages[{i}].content[{j}]"))
    return out


def unexpected_error(e: BaseException, source: str, line: int) -> DataError:
    """A failure no check foresaw, as that sample's (or file's) located error: the report goes on."""
    if isinstance(e, MemoryError):
        return DataError("out_of_memory", "checking it ran out of memory",
                         "shorten the sample or its media, or lower the recipe's data.max_* caps", file=source, line=line)
    if isinstance(e, UnsafeJsonError):
        return DataError(e.kind, str(e), "flatten it, with valid Unicode text", file=source, line=line)
    if isinstance(e, RecursionError):
        return DataError("too_deep", "it is nested too deep to read (a RecursionError)",
                         "flatten it: a sample needs about 6 levels of nesting", file=source, line=line)
    if isinstance(e, ValueError) and "digits" in str(e):  # json: an integer of more than 4300 digits
        return DataError("json", f"unreadable JSON: {str(e).split(';')[0]}", "write huge numbers as strings",
                         file=source, line=line)
    return DataError("unexpected", f"checking it failed: {type(e).__name__}: {e}",
                     "fix what the message names; if it names nothing in the data, please report it as a bug",
                     file=source, line=line)


_ENCODE_FIX = "run `python -m finetune data check --recipe RECIPE` on the file; it names the part to change"




def problems_of(s: Sample, family, processor, config: dict, rope, max_tokens: int | None,
                checker: MediaChecker | None = None, tally: dict | None = None) -> tuple[int | None, list[DataError]]:
    """(planned token count, errors) of one sample: media decode, metadata count, encode + check.
    `tally` (if given) counts, over the samples that passed, the clips `data.long_audio: truncate`
    cut and the video sound tracks the model does not read (`audio_notes` words them)."""
    n, errors, _ = check_sample(s, family, processor, config, rope, max_tokens, checker, tally)
    if tally is not None and not errors:
        _count_video_sound(s, family, processor, tally)
    return n, errors


def check_sample(s: Sample, family, processor, config: dict, rope, max_tokens: int | None,
           checker: MediaChecker | None = None, tally: dict | None = None):
    """(planned token count, errors, the encoding when there was one) of one sample."""
    bad = modality_errors(s, family) or media_errors(s, checker)
    if bad:
        return None, bad, None

    def error(kind, problem, fix=_ENCODE_FIX):
        return DataError(kind, problem, fix, file=s.source, line=s.line, field="messages")

    try:
        n = family.count_tokens(s, processor)
    except DataError as e:  # a located problem of the sample's own (a clip past the processor's limit, ...)
        return None, [e], None
    except Exception as e:  # a header or option the processor cannot use: the sample's problem
        return None, [error("encode", f"counting its tokens failed: {type(e).__name__}: {e}")], None
    if max_tokens is not None and n > max_tokens:
        return n, [error("too_long", f"{n} tokens exceed data.max_tokens={max_tokens}",
                         "raise data.max_tokens, lower model.max_pixels, or shorten the sample")], None
    try:
        enc = family.encode(s, processor, rope=rope)
    except DataError as e:
        return n, [e], None
    except Exception as e:
        return n, [error("encode", f"encoding it as training does failed: {type(e).__name__}: {e}")], None
    problems = [error("inconsistent", p) for p in family.check_encoded(enc, config, planned=n)]
    if tally is not None and not problems:
        tally["truncated_audio"] = tally.get("truncated_audio", 0) + truncated_clips(s, family, processor)
    return n, problems, enc


def truncated_clips(s: Sample, family, processor) -> int:
    """How many of a sample's clips `data.long_audio: truncate` cuts to what the family's processor
    reads (0 under error and split: those refuse or keep every sample)."""
    limit = family.max_audio_samples(processor)
    if processor.long_audio != "truncate" or limit is None:
        return 0
    return sum(n > limit for _, n, _ in family.audio_clips(s, processor))


def _count_video_sound(s: Sample, family, processor, tally: dict) -> None:
    """Video files with a sound track that the run does not read (the family cannot, or was not asked to)."""

    for msg in s.messages:
        for part in msg.parts:
            if part.type != "video" or part.path is None or not media.video_has_audio(part.path):
                continue
            if not family.audio_in_video:
                tally["video_sound_ignored"] = tally.get("video_sound_ignored", 0) + 1
            elif not family.reads_video_sound(s, part, processor):
                tally["video_sound_unread"] = tally.get("video_sound_unread", 0) + 1


def audio_notes(tally: dict, family, processor) -> list[str]:
    """One line for each kind of audio the run does not read whole (the tally of `problems_of` /
    `prepare`): clips truncated to the processor's limit, video sound tracks not read."""
    notes = []
    if tally.get("truncated_audio"):
        limit = family.max_audio_samples(processor) / processor.sampling_rate
        notes.append(f"{tally['truncated_audio']} audio clip(s) longer than the {limit:g} s that {family.title}'s processor "
                     f"reads were truncated to their first {limit:g} s (data.long_audio: truncate; split keeps all of "
                     "them as consecutive clips)")
    if tally.get("video_sound_ignored"):
        notes.append(f"{tally['video_sound_ignored']} video(s) have a sound track: {family.title}'s processor reads no "
                     "sound from a video, so they are read for their frames only")
    if tally.get("video_sound_unread"):
        notes.append(f"{tally['video_sound_unread']} video(s) have a sound track that is not read: set "
                     "model.use_audio_in_video: true (or \"use_audio_in_video\": true on a video part) to read it with "
                     f"the frames, as {family.title}'s processor does with use_audio_in_video")
    return notes



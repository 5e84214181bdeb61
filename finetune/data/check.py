"""Dataset checker: reports every problem of every line (or table row) at once, plus a summary.

JSONL files (ours, or LLaMA-Factory / ms-swift / OpenAI ones converted in memory) are read line by
line; Parquet files, `datasets` save_to_disk folders and hub sources row by row (finetune.data.hf),
with their problems located by row.

Usage: ``python -m finetune.data.check FILE [FILE...]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from finetune.data import media
from finetune.data.convert import dataset_ref, read_converted
from finetune.data.media import MediaError
from finetune.data.schema import (
    MEDIA_TYPES,
    DataError,
    Limits,
    Part,
    Sample,
    UnsafeJsonError,
    current_limits,
    iter_jsonl,
    parse_sample,
    set_limits,
    special_file,
)
from finetune.errors import UserError

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


@dataclass
class CheckReport:
    """Outcome of :func:`check_dataset`."""

    files: list[str]
    n_samples: int
    n_ok: int
    errors: list[DataError]
    modality_counts: dict[str, int]
    token_counts: list[int] | None = None
    #: what the model reads differently from the files (audio truncated to its processor's limit,
    #: video sound it does not read): one line each, said once for the dataset
    notes: list[str] = field(default_factory=list)

    def error_counts(self) -> dict[str, int]:
        """Number of errors per kind, most frequent first."""
        return dict(Counter(e.kind for e in self.errors).most_common())

    def format(self) -> str:
        """Every error on its own line, then a summary with an optional token histogram."""
        lines = [str(e) for e in self.errors]
        if lines:
            lines.append("")
        n_files = len(self.files)
        lines.append(
            f"checked {n_files} file{'s' if n_files != 1 else ''}: "
            f"{self.n_samples} samples, {self.n_ok} ok, {len(self.errors)} errors"
        )
        counts = self.error_counts()
        if counts:
            lines.append("errors by kind:")
            width = max(len(k) for k in counts)
            lines += [f"  {k:<{width}}  {v}" for k, v in counts.items()]
        if self.modality_counts:
            lines.append("modality mix:")
            width = max(len(k) for k in self.modality_counts)
            mix = sorted(self.modality_counts.items(), key=lambda kv: (-kv[1], kv[0]))
            lines += [f"  {k:<{width}}  {v}" for k, v in mix]
        if self.token_counts:
            lines += _histogram(self.token_counts)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _histogram(counts: list[int], buckets: int = 8, bar_width: int = 40) -> list[str]:
    arr = np.asarray(counts)
    lo, hi = int(arr.min()), int(arr.max())
    out = [
        f"token lengths (n={len(arr)}): min {lo}, median {round(float(np.median(arr)))}, "
        f"p95 {round(float(np.percentile(arr, 95)))}, max {hi}"
    ]
    n_buckets = min(buckets, hi - lo + 1)
    edges = np.linspace(lo, hi + 1, n_buckets + 1)
    hist, _ = np.histogram(arr, bins=edges)
    top = max(int(hist.max()), 1)
    labels = [f"{int(np.ceil(edges[i]))}-{int(np.ceil(edges[i + 1])) - 1}" for i in range(n_buckets)]
    width = max(len(s) for s in labels)
    for label, n in zip(labels, hist):
        bar = "#" * max(int(round(n / top * bar_width)), 1 if n else 0)
        out.append(f"  {label:>{width}} | {bar + ' ' if bar else ''}{int(n)}")
    return out


def _modality_key(sample: Sample) -> str:
    present = [t for t in MEDIA_TYPES if t in sample.modalities()]
    return "+".join(present) if present else "text-only"


class _MediaChecker:
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
            from finetune.data.convert import atomic_write

            atomic_write(self._record_path, lambda fh: fh.write(json.dumps(self._ok)))

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


def _records(path: Path, errors: list[DataError], allow_outside_paths: bool):
    """(line, object, relocate) triples of a dataset file, and whether outside paths are allowed.

    Our JSONL is read as is. LLaMA-Factory (a `dataset_info.json#name` too), ms-swift and OpenAI
    files are converted in memory first; conversion errors are reported as they are, and `relocate`
    moves a later error of a converted sample to its source record (its line, or record[i] in a JSON
    list). Converted media paths are absolute and were held inside the dataset's folder by the
    conversion. A problem of the whole file (preference data) is its one error."""
    try:
        res = read_converted(path, on_error="skip", allow_outside_paths=allow_outside_paths)
    except DataError as e:
        errors.append(e)
        return [], True
    if res is None:
        return ((line, obj, None) for line, obj in iter_jsonl(path)), allow_outside_paths
    errors.extend(res.errors)
    return [(loc.line, obj, loc.relocate) for loc, obj in zip(res.locations, res.samples)], True


def media_errors(sample: Sample, checker: "_MediaChecker | None" = None) -> list[DataError]:
    """Every unreadable media file of a sample (decoded fully, once per file per checker)."""
    checker = checker or _MediaChecker()
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
    from finetune.families import _registry

    out: list[DataError] = []
    for i, msg in enumerate(sample.messages):
        for j, part in enumerate(msg.parts):
            if part.is_media and part.type not in family.modalities:
                takes = " and ".join(t for t in MEDIA_TYPES if t in family.modalities) or "text only"
                others = sorted(cls.title for cls in _registry().values() if part.type in cls.modalities)
                fix = (f"remove the {part.type} part, or the sample (data.on_error: skip leaves such samples out "
                       f"and counts them)" + (f", or train a model that takes {part.type} ({', '.join(others)})"
                                              if others else ""))
                out.append(DataError("modality", f"{family.title} takes {takes}, not {part.type}", fix,
                                     file=sample.source, line=sample.line, field=f"messages[{i}].content[{j}]"))
    return out


def check_dataset(
    paths: list[Path],
    *,
    token_counter: Callable[[Sample], int] | None = None,
    max_tokens: int | None = None,
    allow_outside_paths: bool = False,
    open_media: bool = True,
    family=None,
    processor=None,
    config: dict | None = None,
    limits: Limits | None = None,
) -> CheckReport:
    """Validate every line of every file and collect all problems into a report.

    With ``open_media`` every referenced media file is decoded; with
    ``token_counter`` each error-free sample is measured and samples longer
    than ``max_tokens`` are reported as ``too_long``. With a ``family`` and its
    ``processor`` (and the model's ``config``, read from the processor's folder
    when omitted) each sample is also encoded as training encodes it and checked
    as the model's forward will check it (see finetune.data.prepare).
    ``limits`` (a recipe's ``data.max_*``; default the current ones) bound every
    line, text and media file before it is parsed or decoded; one sample's
    failure, whatever it is, is that sample's error and the check goes on.
    """
    if limits is not None:
        set_limits(limits)
    if family is not None and token_counter is None:
        token_counter = lambda s: family.count_tokens(s, processor)  # noqa: E731
    files = [_describe(p) for p in paths]
    errors: list[DataError] = []
    modality_counts: Counter[str] = Counter()
    token_counts: list[int] | None = [] if token_counter is not None else None
    n_samples = n_ok = 0
    checker = _MediaChecker()
    tally: dict[str, int] = {}

    def sample_checks(sample: Sample) -> list[DataError]:
        found: list[DataError] = modality_errors(sample, family) if family is not None else []
        if found:  # nothing to decode or count for a model that cannot take it
            return found
        try:
            if open_media:
                found += media_errors(sample, checker)
            if token_counter is not None and not found:
                found += _count_tokens(sample, token_counter, max_tokens, token_counts)
            if family is not None and open_media and not found:
                from finetune.data.prepare import problems_of

                found += problems_of(sample, family, processor, config or {}, None, None, checker, tally)[1]
        except Exception as e:  # one sample never ends the report, whatever it raises (MemoryError too)
            found.append(_unexpected(e, sample.source, sample.line))
        return found

    for item in paths:
        if _is_table(item):
            # Parquet, save_to_disk folders, hub datasets: every row built and validated, then each
            # sample checked as a JSONL sample is (its media files are the materialised ones)
            try:
                table_errors, table_samples = _table(item, allow_outside_paths)
            except Exception as e:  # a table the datasets library chokes on is that source's one error
                table_errors, table_samples = [_unexpected(e, _describe(item), 0)], []
            errors += table_errors
            n_samples += len(table_errors) + len(table_samples)
            for sample in table_samples:
                modality_counts[_modality_key(sample)] += 1
                sample_errors = sample_checks(sample)
                errors += sample_errors
                n_ok += not sample_errors
            if not table_errors and not table_samples:
                errors.append(DataError("empty", "the dataset has no rows", "add rows", file=_describe(item)))
            continue
        path = Path(item)
        source = str(path)
        what = special_file(path)
        if what is not None:
            errors.append(DataError("not_regular_file", f"the dataset file is {what}, not a regular file",
                                    "give the dataset file itself; only regular files are read (a FIFO or device "
                                    "could block the reader or never end)", file=source))
            continue
        if not path.is_file() and not dataset_ref(path):
            errors.append(DataError("missing_file", f"dataset file '{path}' does not exist",
                                    "check the file path", file=source))
            continue
        n_in_file = 0
        n_errors = len(errors)
        try:
            records, outside = _records(path, errors, allow_outside_paths)
        except Exception as e:  # the file cannot be read at all (a whole-file JSON nested 200k deep, ...)
            errors.append(e if isinstance(e, DataError) else _unexpected(e, source, 0))
            continue
        n_samples += len(errors) - n_errors  # records that failed conversion
        n_in_file += len(errors) - n_errors
        for lineno, obj, relocate in records:
            n_samples += 1
            n_in_file += 1
            if isinstance(obj, DataError):
                errors.append(obj)
                continue
            try:
                sample = parse_sample(obj, source=source, line=lineno, base_dir=path.parent,
                                      allow_outside_paths=outside)
            except DataError as e:
                errors.append(relocate(e) if relocate else e)
                continue
            except Exception as e:  # MemoryError, RecursionError, a path the OS refuses, ...
                errors.append(_unexpected(e, source, lineno))
                continue
            modality_counts[_modality_key(sample)] += 1
            sample_errors = sample_checks(sample)
            errors += [relocate(e) for e in sample_errors] if relocate else sample_errors
            if not sample_errors:
                n_ok += 1
        if n_in_file == 0:
            errors.append(DataError("empty", "the file has no samples",
                                    "add one JSON sample per line", file=source))

    notes = []
    if family is not None:
        from finetune.data.prepare import audio_notes

        notes = audio_notes(tally, family, processor)
    return CheckReport(files=files, n_samples=n_samples, n_ok=n_ok, errors=errors,
                       modality_counts=dict(modality_counts), token_counts=token_counts, notes=notes)


def _unexpected(e: BaseException, source: str, line: int) -> DataError:
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


def _is_table(item) -> bool:
    """A source read with the `datasets` library (a Parquet file, a save_to_disk folder, a source
    object with hub/format hf), not one of our JSONL files."""
    from finetune.data.sources import source_format

    if not isinstance(item, (str, Path)):
        return True  # a data-source object (recipe.py's DataSource): sources decides, in _table
    return source_format(item) == "hf"


def _describe(item) -> str:
    from finetune.data.sources import describe

    return describe(item)


def _table(item, allow_outside_paths: bool) -> tuple[list[DataError], list[Sample]]:
    """(errors, samples) of a table source, every bad row reported (a problem of the source itself,
    such as a missing column, is its one error)."""
    from finetune.data.hf import _get, load_hf_samples
    from finetune.data.sources import load_json_records, source_format
    from finetune.paths import cache_root

    try:
        if source_format(item) == "jsonl":  # a source object naming a JSON(L) file
            path = Path(str(_get(item, "path")))
            if not path.is_file() and not dataset_ref(path):
                return [DataError("missing_file", f"dataset file '{path}' does not exist", "check the file path",
                                  file=str(path))], []
            samples, errs = load_json_records(path, on_error="skip", allow_outside_paths=allow_outside_paths)
            return errs, samples
        src = {"path": str(item)} if isinstance(item, (str, Path)) else item
        samples, errs = load_hf_samples(src, on_error="skip", allow_outside_paths=allow_outside_paths,
                                        media_dir=cache_root() / "media")
    except DataError as e:
        return [e], []
    except UserError as e:  # a hub id that is not in the cache, a bad source setting
        return [DataError("source", str(e), file=_describe(item))], []
    return errs, samples


def _count_tokens(sample: Sample, counter, max_tokens, token_counts: list[int]) -> list[DataError]:
    try:
        n = int(counter(sample))
    except DataError as e:  # located by the model's processor (a clip longer than it reads, ...)
        return [e]
    except Exception as e:  # any failure inside a model processor is a data problem here
        return [DataError("encode", f"encoding the sample failed: {type(e).__name__}: {e}",
                          "check the sample's text and media against the model's processor",
                          file=sample.source, line=sample.line)]
    token_counts.append(n)
    if max_tokens is not None and n > max_tokens:
        return [DataError("too_long", f"the sample has {n} tokens, more than data.max_tokens={max_tokens}",
                          "raise data.max_tokens or shorten the sample",
                          file=sample.source, line=sample.line)]
    return []


def main(argv: list[str] | None = None) -> int:
    """Check dataset files from the command line; exit status 1 when any error is found."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune.data.check",
        description="Validate omni-modal JSONL datasets and report every problem at once.",
    )
    parser.add_argument("files", nargs="+", type=Path, help="dataset files: JSONL, Parquet, or save_to_disk folders")
    parser.add_argument("--no-media", action="store_true",
                        help="only check that media files exist; do not decode them")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="allow media paths outside each dataset file's folder")
    args = parser.parse_args(argv)
    report = check_dataset(args.files, allow_outside_paths=args.allow_outside_paths,
                           open_media=not args.no_media)
    print(report.format())
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
